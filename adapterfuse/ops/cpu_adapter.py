"""The "cpu" backend: the fused C++ CPU kernels of csrc/adapter_cpu.cpp (row blocks kept in cache,
at::parallel_for, sgemm per block), exposed as the custom ops adapterfuse::cpu_fwd / cpu_bwd with
fake implementations and the shared autograd formula. The extension is built on first use."""
import torch

from ._extension import define_backend, extension_reason

cpu_fwd, cpu_bwd, fused = define_backend("cpu")


def unavailable_reason(build: bool = True):
    return extension_reason("cpu", build)


def check_call(device_type: str, dtype: torch.dtype) -> None:
    """Every fused dtype runs on this backend; nothing more to refuse."""
