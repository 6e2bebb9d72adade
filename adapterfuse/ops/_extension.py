"""Building and loading the C++/CUDA extension (csrc/), and the custom ops around it.

Two ways to get the extension, tried in this order:

* ahead of time (opt-in): ``ADAPTERFUSE_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiles
  ``adapterfuse._ext`` against the installed torch and writes ``adapterfuse/_ext_build.json`` with the
  torch / CUDA versions it was built for. A build for another torch or CUDA version is refused with a
  message that says so (importing it could crash: the C++ ABI of torch changes between releases).
* just in time (default): the first call of a "cpu" / "cuda" backend compiles csrc/ with
  torch.utils.cpp_extension.load and ninja into a cache directory (``ADAPTERFUSE_EXT_DIR``, default
  ``~/.cache/adapterfuse``) keyed by the torch / CUDA / Python versions, the compile flags, the source
  contents and, for the -march=native build, the CPU, so it is built once per environment and CPU kind.
  Building needs a C++ compiler and ninja (and nvcc for the CUDA kernels); loading a complete cached
  build needs neither. An OS file lock serialises concurrent builds and survives a killed build.

The CUDA kernels are compiled in only when torch is a CUDA build and nvcc is found; the CPU path is
always there. Nothing here runs at import time of adapterfuse.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from .._build import AOT_INFO_NAME, PACKAGE_DIR, cxx_flags, ld_flags, nvcc_flags, sources, version_tag, want_cuda
from .._checks import ACTIVATIONS
from ._common import alloc, define_adapter_ops

AOT_INFO = PACKAGE_DIR / AOT_INFO_NAME


class ExtensionUnavailable(RuntimeError):
    pass


def _prebuilt_files() -> list:
    """The ahead-of-time build shipped inside the package (ADAPTERFUSE_BUILD_EXT=1 pip install), if any."""
    return glob.glob(str(PACKAGE_DIR / "_ext*.so")) + glob.glob(str(PACKAGE_DIR / "_ext*.pyd"))


def _load_aot():
    """The ahead-of-time build, if there is one; refuses a build made for another torch / CUDA."""
    built = _prebuilt_files()
    if not built:
        return None
    info = json.loads(AOT_INFO.read_text()) if AOT_INFO.is_file() else {}
    have = {"torch": torch.__version__, "cuda": torch.version.cuda}
    want = {"torch": info.get("torch"), "cuda": info.get("cuda")}
    if want != have:
        raise ExtensionUnavailable(
            f"the prebuilt extension {Path(built[0]).name} was built for torch {want['torch']} / CUDA {want['cuda']}, "
            f"but torch {have['torch']} / CUDA {have['cuda']} is installed; rebuild it with "
            "`ADAPTERFUSE_BUILD_EXT=1 pip install --no-build-isolation -e .`, or delete it to use the JIT build")
    from adapterfuse import _ext  # type: ignore[attr-defined]

    return _ext


def cache_root() -> Path:
    """The JIT cache: ADAPTERFUSE_EXT_DIR when set and non-empty, else ~/.cache/adapterfuse."""
    env = os.environ.get("ADAPTERFUSE_EXT_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adapterfuse"


def _module_name(with_cuda: bool) -> str:
    return f"adapterfuse_ext_{'cuda' if with_cuda else 'cpu'}"


def _built_library(build_dir: Path, name: str) -> Optional[Path]:
    for cand in sorted(build_dir.glob(f"{name}*.so")) + sorted(build_dir.glob(f"{name}*.pyd")):
        return cand
    return None


def _import_library(path: Path, name: str):
    """Import a built extension from its file (no compiler involved)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """An OS file lock around a build. Unlike torch's own lock file (a plain file that a killed build leaves
    behind, after which every later build waits forever), the OS releases it when its holder dies; holding
    it, any torch lock file left in the directory is stale and is removed."""
    lock_path = build_dir / ".adapterfuse-build.lock"
    with open(lock_path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no OS lock; torch's own lock still serialises builds
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if fcntl is not None and stale.exists():
                stale.unlink()
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_build(build_dir: Path, name: str, announce: str, build):
    """Import `name` from build_dir, building it there first (under the build lock) when it is missing."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = _build_lock(build_dir)
        lock.__enter__()
    except OSError as e:
        raise ExtensionUnavailable(f"the extension cache {build_dir} is not writable ({e}); set ADAPTERFUSE_EXT_DIR "
                                   "to a writable directory") from e
    try:
        built = _built_library(build_dir, name)  # another process may have built it while we waited
        if built is not None:
            return _import_library(built, name)
        print(f"adapterfuse: building {announce} in {build_dir}", file=sys.stderr, flush=True)
        return build()
    except OSError as e:
        raise ExtensionUnavailable(f"building {announce} in {build_dir} failed: {e}") from e
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        tail = str(e).strip().splitlines()[-5:]
        raise ExtensionUnavailable(f"building {announce} failed (ADAPTERFUSE_VERBOSE=1 shows the compiler "
                                   "output): " + " | ".join(tail)) from e
    finally:
        lock.__exit__(None, None, None)


#: what backend_status() says of an extension backend that can be built here but has not been yet
NOT_BUILT = "not built yet, builds on first use"


def _jit_target():
    """(with_cuda, module name, cache directory) of the JIT build for this machine."""
    with_cuda = want_cuda()
    return with_cuda, _module_name(with_cuda), cache_root() / version_tag(with_cuda, native=True)


def _jit_missing() -> Optional[str]:
    """What building the extension here lacks (a compiler, ninja), or None."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    return "building the extension needs " + " and ".join(missing) if missing else None


def _load_jit():
    """The JIT-built extension: loaded from the cache when a build for exactly these sources, flags, torch
    and CPU is there (no compiler needed), else compiled into it (compiler and ninja needed)."""
    with_cuda, name, build_dir = _jit_target()
    built = _built_library(build_dir, name) if build_dir.is_dir() else None
    if built is not None:
        return _import_library(built, name)
    missing = _jit_missing()
    if missing:
        raise ExtensionUnavailable(missing)
    from torch.utils.cpp_extension import load

    verbose = os.environ.get("ADAPTERFUSE_VERBOSE") == "1"
    return _cached_build(
        build_dir, name, f"the C++{'/CUDA' if with_cuda else ''} extension (once per torch version and CPU, about "
        "a minute on 2 cores)",
        lambda: load(name=name, sources=sources(with_cuda), extra_cflags=cxx_flags(with_cuda, native=True),
                     extra_cuda_cflags=nvcc_flags(), extra_ldflags=ld_flags(), with_cuda=with_cuda,
                     build_directory=str(build_dir), verbose=verbose))


def _emulation_target():
    """(module name, cache directory) of the CUDA-emulation build."""
    import hashlib

    from . import _emulation

    key = version_tag(True, native=False) + " ".join(_emulation.build_flags())
    return "adapterfuse_ext_cudaemu", cache_root() / ("emu-" + hashlib.sha1(key.encode()).hexdigest()[:12])


def _load_emulation():
    """The CUDA-emulation build of the extension (ops/_emulation.py), cached like the JIT build."""
    from . import _emulation

    if _emulation.cuda_include_dir() is None:
        raise ExtensionUnavailable(_emulation.HEADERS_MISSING)
    name, build_dir = _emulation_target()
    built = _built_library(build_dir, name) if build_dir.is_dir() else None
    if built is not None:
        return _import_library(built, name)
    verbose = os.environ.get("ADAPTERFUSE_VERBOSE") == "1"
    return _cached_build(build_dir, name, "the CUDA emulation (the CUDA kernels as C++ for the CPU)",
                         lambda: _emulation.build(build_dir, name=name, verbose=verbose))


@functools.lru_cache(maxsize=1)
def _load_emulation_cached():
    try:
        return _load_emulation(), None
    except ExtensionUnavailable as e:
        return None, str(e)


def load_for(backend: str):
    """The module that runs `backend` ("cpu" or "cuda"): the CUDA emulation for "cuda" when it is on."""
    from . import _emulation

    if backend == "cuda" and _emulation.enabled():
        mod, why = _load_emulation_cached()
        if mod is None:
            raise ExtensionUnavailable(why)
        return mod
    return load()


@functools.lru_cache(maxsize=1)
def _load_cached():
    try:
        mod = _load_aot() or _load_jit()
    except ExtensionUnavailable as e:
        if not str(e).startswith("the prebuilt extension"):  # said once (cached): auto falls back quietly otherwise
            warnings.warn(f"adapterfuse: the C++ extension is unavailable, so backend='auto' uses another backend "
                          f"(the pure-torch reference on CPU): {e}", RuntimeWarning, stacklevel=3)
        return None, str(e)
    except FileNotFoundError as e:  # no csrc/ shipped
        return None, str(e)
    info = dict(mod.build_info())
    built_for = info.get("torch_version", "unknown")
    if built_for != "unknown" and not torch.__version__.startswith(built_for):
        return None, (f"the extension was compiled against torch {built_for} headers but torch {torch.__version__} "
                      "is running; rebuild it")
    return mod, None


def load():
    """The extension module; raises ExtensionUnavailable saying why it cannot be had."""
    mod, why = _load_cached()
    if mod is None:
        raise ExtensionUnavailable(why)
    return mod


def _state_without_building(emulated: bool) -> Optional[str]:
    """None when the extension is loaded or a complete build is cached, NOT_BUILT when it would be built on
    first use, else why it cannot be had. Starts no build (backend_status(), `python -m adapterfuse.info`)."""
    from . import _emulation

    loader = _load_emulation_cached if emulated else _load_cached
    if loader.cache_info().currsize:  # already tried in this process: its answer
        return loader()[1]
    if emulated:
        if _emulation.cuda_include_dir() is None:
            return _emulation.HEADERS_MISSING
        name, build_dir = _emulation_target()
    else:
        if _prebuilt_files():
            return loader()[1]  # a prebuilt extension: importing it compiles nothing
        _, name, build_dir = _jit_target()
    if build_dir.is_dir() and _built_library(build_dir, name) is not None:
        return None
    return _jit_missing() or NOT_BUILT


def extension_reason(device_type: str, build: bool = True) -> Optional[str]:
    """None if the extension can run tensors of this device type here, else why not. With build=False nothing
    is compiled: an extension that would be built on first use gives NOT_BUILT."""
    from . import _emulation

    if device_type == "cuda" and _emulation.enabled():
        return _load_emulation_cached()[1] if build else _state_without_building(emulated=True)
    if device_type == "cuda":
        if torch.version.cuda is None:
            return "torch is a CPU-only build, so the CUDA kernels cannot be built"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if not want_cuda():
            return "nvcc was not found (set CUDA_HOME), so the CUDA kernels cannot be built"
    if not build:
        state = _state_without_building(emulated=False)
        if state is not None or _load_cached.cache_info().currsize == 0:
            return state  # (a cached build is there; whether it has CUDA kernels is known once it is loaded)
    mod, why = _load_cached()
    if mod is None:
        return why
    if device_type == "cuda" and not mod.build_info()["with_cuda"]:
        return "the extension was built without CUDA kernels"
    return None


def define_backend(name: str):
    """The adapter ops of one extension backend (adapterfuse::adapter_fwd_<name> / adapter_bwd_<name>, see
    ops/_common.py): "cpu" and "cuda" differ only in the device their tensors live on. The extension module is
    looked up per call (load_for is cached), so nothing is built before the first call."""

    def fwd_impl(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                 tokens_per_sample, activation):
        y = alloc(tuple(x.shape), x.dtype, x.device)
        h = alloc((x.shape[0], w_down.shape[0]), torch.float32, x.device)
        load_for(name).fwd(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                           tokens_per_sample, ACTIVATIONS[activation], y, h)
        return y, h

    def bwd_impl(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
                 activation, skip_is_x, needs):
        return load_for(name).bwd(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale,
                                  tokens_per_sample, ACTIVATIONS[activation], skip_is_x, needs)

    return define_adapter_ops(name, fwd_impl, bwd_impl)


def define_bank_backend(name: str):
    """The adapter-bank ops of an extension backend (adapterfuse::adapter_bank_fwd_<name> / _bwd_<name>): the
    extension's bank kernels (csrc/adapter_bank_cpu.cpp) run CPU tensors."""

    def fwd_impl(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                 tokens_per_sample, activation, index):
        y = alloc(tuple(x.shape), x.dtype, x.device)
        h = alloc((x.shape[0], w_down.shape[1]), torch.float32, x.device)
        load_for(name).bank_fwd(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                                tokens_per_sample, ACTIVATIONS[activation], index, y, h)
        return y, h

    def bwd_kernels(packed):
        def bwd_impl(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
                     activation, skip_is_x, needs, index):
            return load_for(name).bank_bwd(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale,
                                           tokens_per_sample, ACTIVATIONS[activation], skip_is_x, needs, index,
                                           packed)
        return bwd_impl

    # eager: the weight gradients as views of one allocation (fewer page faults per step, adapter_bank_cpu.cpp);
    # the custom op returns separate tensors (a custom op's outputs may not alias each other)
    return define_adapter_ops(name, fwd_impl, bwd_kernels(False), op="adapter_bank", eager_bwd_impl=bwd_kernels(True))


def define_ln_dropout_backend(name: str):
    """The adapter_ln_dropout ops of an extension backend (adapterfuse::adapter_ln_dropout_fwd_<name> / _bwd_<name>,
    ops/_common.py): the adapter's CPU kernels with the input LayerNorm and / or dropout (csrc/adapter_cpu.cpp)."""

    def fwd_impl(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                 tokens_per_sample, activation, ln_eps, dropout_p, seed):
        y = alloc(tuple(x.shape), x.dtype, x.device)
        h = alloc((x.shape[0], w_down.shape[0]), torch.float32, x.device)
        stats = alloc((x.shape[0], 3) if ln_eps >= 0 else (0,), torch.float32, x.device)
        load_for(name).ln_dropout_fwd(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x,
                                      sample_scale, tokens_per_sample, ACTIVATIONS[activation], ln_eps, dropout_p,
                                      seed, y, h, stats)
        return y, h, stats

    def bwd_impl(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
                 activation, skip_is_x, needs, stats, seed, dropout_p):
        return load_for(name).ln_dropout_bwd(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale,
                                             tokens_per_sample, ACTIVATIONS[activation], skip_is_x, needs, stats,
                                             seed, dropout_p)

    return define_adapter_ops(name, fwd_impl, bwd_impl, op="adapter_ln_dropout")


def define_linear_backend(name: str, adapter_ops):
    """The Linear + adapter op of an extension backend (adapterfuse::linear_adapter_fwd_<name>,
    ops/linear_adapter.py): the forward kernel of csrc/linear_adapter_cpu.cpp; its backward is the backend's
    adapter bwd op (adapter_ops) and torch GEMMs."""
    from .linear_adapter import define_linear_adapter_ops

    def fwd_impl(inp, weight, bias, w_down, b_down, w_up, b_up, scale, scale_value, residual, residual_before,
                 activation, save, ln_weight, ln_bias, ln_eps):
        m, d, r = inp.shape[0], weight.shape[0], w_down.shape[0]
        y = alloc((m, d), inp.dtype, inp.device)
        t = alloc((m, d), inp.dtype, inp.device) if save else inp.new_empty((0,))
        h = alloc((m, r), torch.float32, inp.device) if save else inp.new_empty((0,), dtype=torch.float32)
        load_for(name).linear_fwd(inp, weight, bias, w_down, b_down, w_up, b_up, scale, scale_value, residual,
                                  residual_before, ACTIVATIONS[activation], ln_weight, ln_bias, ln_eps, y, t, h)
        return y, t, h

    return define_linear_adapter_ops(name, fwd_impl, adapter_ops)
