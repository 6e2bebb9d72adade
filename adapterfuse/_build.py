"""Build configuration of the C++/CUDA extension, shared by the JIT loader (adapterfuse.ops._extension)
and the ahead-of-time build in setup.py. No package-relative imports: setup.py runs this file directly."""
import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import List

PACKAGE_DIR = Path(__file__).resolve().parent
#: written next to the AOT-built extension: the torch / CUDA versions it was compiled for
AOT_INFO_NAME = "_ext_build.json"


def csrc_dir() -> Path:
    """csrc/ of a source checkout, or the copy that setup.py puts inside the package (adapterfuse/_csrc)."""
    for cand in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "_csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    raise FileNotFoundError("adapterfuse: the C++ sources (csrc/) are not installed with this package")


def want_cuda() -> bool:
    """Compile the CUDA kernels in: torch is a CUDA build and nvcc can be found."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def host_sources(with_cuda: bool) -> List[str]:
    """The C++ files compiled by the host compiler: the bindings, the CPU path and, in a CUDA build (or the
    CUDA emulation), the CUDA path's host side."""
    src = csrc_dir()
    files = [src / "bindings.cpp", src / "adapter_cpu.cpp", src / "adapter_bank_cpu.cpp", src / "linear_adapter_cpu.cpp"]
    files += [src / "adapter_cuda.cpp"] if with_cuda else []
    return [str(f) for f in files]


def sources(with_cuda: bool) -> List[str]:
    return host_sources(with_cuda) + ([str(csrc_dir() / "adapter_kernels.cu")] if with_cuda else [])


def cxx_flags(with_cuda: bool, native: bool) -> List[str]:
    # -fopenmp: at::parallel_for is an inline OpenMP region, serial without it
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if native:  # a JIT build runs where it was compiled: use every vector unit of this CPU
        flags.append("-march=native")
    if with_cuda:
        flags.append("-DADAPTERFUSE_WITH_CUDA")
    return flags


def ld_flags() -> List[str]:
    return ["-fopenmp"]


def nvcc_flags() -> List[str]:
    """sm_80 (A100) and sm_90 (H100/H200), as in the CI compile gate, plus PTX for newer GPUs; --threads 0: the
    three targets compiled in parallel."""
    return ["-O3", "-std=c++17", "--threads", "0", "-DADAPTERFUSE_WITH_CUDA",
            "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
            "-gencode", "arch=compute_90,code=compute_90"]


def _cpu_identity() -> str:
    """What a -march=native build depends on: the CPU model and its instruction-set flags."""
    import platform

    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part")):
                    ident += "|" + line.strip()
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        ident += "|" + platform.processor()
    return ident


def sources_digest(with_cuda: bool) -> str:
    """A hash of every source and header the extension is compiled from."""
    h = hashlib.sha1()
    src = csrc_dir()
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.suffix in (".cpp", ".cu", ".h", ".cuh"):
            if not with_cuda and (f.suffix == ".cu" or f.stem == "adapter_cuda" or "emulation" in f.relative_to(src).parts):
                continue  # the CPU build compiles neither the kernels nor the emulation runtime
            h.update(f.relative_to(src).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def version_tag(with_cuda: bool = False, native: bool = True) -> str:
    """Names the JIT cache directory: one build per torch / CUDA / Python / platform, compile flags,
    source contents and (for -march=native builds) CPU, so a cached build is only ever loaded where it is
    valid: a shared home on mixed CPUs gets one build per CPU kind, and an edited source a new build."""
    import torch

    raw = "-".join([torch.__version__, torch.version.cuda or "cpu", f"py{sys.version_info[0]}{sys.version_info[1]}",
                    sysconfig.get_platform(), " ".join(cxx_flags(with_cuda, native)),
                    " ".join(nvcc_flags()) if with_cuda else "", sources_digest(with_cuda),
                    _cpu_identity() if native else ""])
    return hashlib.sha1(raw.encode()).hexdigest()[:12]
