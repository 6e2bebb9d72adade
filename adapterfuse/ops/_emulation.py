"""CPU emulation of the CUDA backend (``ADAPTERFUSE_CUDA_EMULATION=1``), for machines without a GPU.

It builds the unmodified kernels of ``csrc/adapter_kernels.cu`` and the real host glue
(``csrc/bindings.cpp``, compiled with ``-DADAPTERFUSE_CUDA_EMULATION``) as C++ for the CPU, against a small
runtime (``csrc/emulation/``) in which every CUDA thread is a fiber and WMMA is a checked CPU
implementation. With the variable set, ``backend="cuda"`` takes CPU tensors and runs that code path, so the
float64-reference test matrix, the bad-input tests and the integration tests exercise the CUDA kernels in
CI. It is for correctness only, never a performance path: a launch runs every thread of every block on one
CPU thread (seconds for shapes a GPU does in microseconds).

The only source rewrites are mechanical (``rewrite``): the ``<<<grid, block, smem, stream>>>`` launch
becomes ``emu::launch(kernel, grid, block, smem, stream, args...)`` and the ``extern __shared__`` array
becomes the block's dynamic shared memory. ``ADAPTERFUSE_EMU_SCHEDULE`` (asc, desc, random, warp) picks
the order in which threads run between synchronisation points; see ``csrc/emulation/emu_runtime.cpp``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from .._build import csrc_dir, host_sources

ENV = "ADAPTERFUSE_CUDA_EMULATION"
SCHEDULES = ("asc", "desc", "random", "warp")


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's include directory (its host headers give __half, __nv_bfloat16, dim3)."""
    from torch.utils.cpp_extension import CUDA_HOME

    for root in filter(None, (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda")):
        inc = Path(root) / "include"
        if (inc / "cuda_fp16.h").is_file() and (inc / "cuda_runtime_api.h").is_file():
            return inc
    return None


#: why the emulation cannot be built when the toolkit's headers are missing
HEADERS_MISSING = "the CUDA emulation needs the CUDA toolkit's headers (cuda_fp16.h); set CUDA_HOME"


_LAUNCH = re.compile(r"(\w+)<<<([^>]*)>>>\(")
_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned\s+char\s+(\w+)\[\];")


def rewrite(cu_source: str, origin: str = "adapter_kernels.cu") -> str:
    """The .cu source as C++ for the emulation: the launch syntax and the extern shared array, nothing else."""
    out, n_launch = _LAUNCH.subn(r"::emu::launch(\1, \2, ", cu_source)
    out, n_shared = _SHARED.subn(r"unsigned char* \1 = ::emu::dynamic_smem();", out)
    if n_launch == 0 or n_shared == 0:
        raise RuntimeError(f"adapterfuse emulation: expected kernel launches and extern __shared__ arrays in {origin} "
                           f"(found {n_launch} and {n_shared})")
    return f'#include "cuda_runtime.h"\n#line 1 "{origin}"\n' + out


#: the sanitizer build (tests/test_cuda_sanitize.py): AddressSanitizer + UndefinedBehaviorSanitizer, any
#: finding fatal. Its module loads only into a process started with the ASan runtime preloaded (asan_runtime()).
SANITIZE_CFLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g1"]
SANITIZE_LDFLAGS = ["-fsanitize=address,undefined"]


def asan_runtime() -> Optional[str]:
    """What to LD_PRELOAD for the sanitizer build (the compiler's ASan runtime, then its C++ runtime, so that
    ASan's exception interceptor finds __cxa_throw in a python that is not a C++ program), or None."""
    import shutil
    import subprocess

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return None
    libs = []
    for name in ("libasan.so", "libstdc++.so.6"):
        out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not (out and os.path.isabs(out) and os.path.exists(out)):
            return None
        libs.append(out)
    return ":".join(libs)


def build_flags(extra: Optional[List[str]] = None) -> List[str]:
    return ["-O2", "-std=c++17", "-fno-strict-aliasing", "-DADAPTERFUSE_WITH_CUDA", "-DADAPTERFUSE_CUDA_EMULATION",
            "-Wno-attributes", "-Wno-unused-function"] + list(extra or [])


def build(build_dir: Path, kernels: Optional[Path] = None, name: str = "adapterfuse_ext_cudaemu",
          extra_cflags: Optional[List[str]] = None, extra_ldflags: Optional[List[str]] = None, verbose: bool = False):
    """Compile the emulation extension into build_dir (kernels: another .cu to build, e.g. a mutated copy)."""
    from torch.utils.cpp_extension import load

    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError(HEADERS_MISSING)
    src = csrc_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    kernels = kernels or src / "adapter_kernels.cu"
    generated = build_dir / "adapter_kernels_emu.cpp"
    text = rewrite(kernels.read_text(), origin=str(kernels))
    if not generated.is_file() or generated.read_text() != text:  # keep ninja's timestamps when unchanged
        generated.write_text(text)
    return load(name=name, sources=host_sources(True) + [str(generated), str(src / "emulation" / "emu_runtime.cpp")],
                extra_cflags=build_flags(extra_cflags) + ["-fopenmp"], extra_ldflags=["-fopenmp"] + list(extra_ldflags or []),
                extra_include_paths=[str(src / "emulation"), str(src), str(inc)],
                with_cuda=False, build_directory=str(build_dir), verbose=verbose)
