"""Building and loading the C++/CUDA extension (csrc/), and the custom ops around it.

Two ways to get the extension, tried in this order:

* ahead of time (opt-in): ``ADAPTERFUSE_BUILD_EXT=1 pip install --no-build-isolation -e .`` compiles
  ``adapterfuse._ext`` against the installed torch and writes ``adapterfuse/_ext_build.json`` with the
  torch / CUDA versions it was built for. A build for another torch or CUDA version is refused with a
  message that says so (importing it could crash: the C++ ABI of torch changes between releases).
* just in time (default): the first call of a "cpu" / "cuda" backend compiles csrc/ with
  torch.utils.cpp_extension.load and ninja into a cache directory (``ADAPTERFUSE_EXT_DIR``, default
  ``~/.cache/adapterfuse``) keyed by the torch / CUDA / Python versions, so it is built once per
  environment. It needs a C++ compiler and ninja (and nvcc for the CUDA kernels).

The CUDA kernels are compiled in only when torch is a CUDA build and nvcc is found; the CPU path is
always there. Nothing here runs at import time of adapterfuse.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from .._build import AOT_INFO_NAME, PACKAGE_DIR, cxx_flags, ld_flags, nvcc_flags, sources, version_tag, want_cuda
from .._checks import ACTIVATIONS
from ._common import alloc, make_autograd_function, register_fakes

AOT_INFO = PACKAGE_DIR / AOT_INFO_NAME


class ExtensionUnavailable(RuntimeError):
    pass


def _load_aot():
    """The ahead-of-time build, if there is one; refuses a build made for another torch / CUDA."""
    built = glob.glob(str(PACKAGE_DIR / "_ext*.so")) + glob.glob(str(PACKAGE_DIR / "_ext*.pyd"))
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


def _load_jit():
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)")
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if missing:
        raise ExtensionUnavailable("building the extension needs " + " and ".join(missing))
    with_cuda = want_cuda()
    build_dir = Path(os.environ.get("ADAPTERFUSE_EXT_DIR", Path.home() / ".cache" / "adapterfuse")) / version_tag()
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load(name=f"adapterfuse_ext_{'cuda' if with_cuda else 'cpu'}", sources=sources(with_cuda),
                    extra_cflags=cxx_flags(with_cuda, native=True), extra_cuda_cflags=nvcc_flags(),
                    extra_ldflags=ld_flags(),
                    with_cuda=with_cuda, build_directory=str(build_dir), verbose=os.environ.get("ADAPTERFUSE_VERBOSE") == "1")
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        tail = str(e).strip().splitlines()[-5:]
        raise ExtensionUnavailable("building the extension failed (ADAPTERFUSE_VERBOSE=1 shows the compiler "
                                   "output): " + " | ".join(tail)) from e


@functools.lru_cache(maxsize=1)
def _load_cached():
    try:
        mod = _load_aot() or _load_jit()
    except ExtensionUnavailable as e:
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


def extension_reason(device_type: str) -> Optional[str]:
    """None if the extension can run tensors of this device type here, else why not."""
    if device_type == "cuda":
        if torch.version.cuda is None:
            return "torch is a CPU-only build, so the CUDA kernels cannot be built"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        if not want_cuda():
            return "nvcc was not found (set CUDA_HOME), so the CUDA kernels cannot be built"
    mod, why = _load_cached()
    if mod is None:
        return why
    if device_type == "cuda" and not mod.build_info()["with_cuda"]:
        return "the extension was built without CUDA kernels"
    return None


def define_backend(name: str):
    """The custom ops (adapterfuse::<name>_fwd / _bwd), their fakes and the autograd.Function of one
    extension backend. "cpu" and "cuda" differ only in the device their tensors live on."""

    @torch.library.custom_op(f"adapterfuse::{name}_fwd", mutates_args=())
    def fwd(x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
            b_up: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
            skip: Optional[torch.Tensor], skip_is_x: bool, sample_scale: Optional[torch.Tensor],
            tokens_per_sample: int, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
        y = alloc(tuple(x.shape), x.dtype, x.device)
        h = alloc((x.shape[0], w_down.shape[0]), torch.float32, x.device)
        load().fwd(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                   tokens_per_sample, ACTIVATIONS[activation], y, h)
        return y, h

    @torch.library.custom_op(f"adapterfuse::{name}_bwd", mutates_args=())
    def bwd(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor,
            b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
            scale: Optional[torch.Tensor], scale_value: float, sample_scale: Optional[torch.Tensor],
            tokens_per_sample: int, activation: str, skip_is_x: bool, needs: List[bool]) -> List[torch.Tensor]:
        return load().bwd(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
                          ACTIVATIONS[activation], skip_is_x, needs)

    register_fakes(fwd, bwd)
    fn = make_autograd_function(fwd, bwd, f"{name.upper()}AdapterFunction")
    return fwd, bwd, fn
