"""The "cuda" backend: the hand-written CUDA kernels of csrc/adapter_kernels.cu (WMMA tensor cores for
fp16/bf16, 16-byte vector loads, deterministic two-stage weight-gradient reduction), exposed as the
custom ops adapterfuse::cuda_fwd / cuda_bwd with fake implementations and the shared autograd formula.
The extension is built on first use (or ahead of time, see README.md)."""
import torch

from ._extension import define_backend, extension_reason

cuda_fwd, cuda_bwd, fused = define_backend("cuda")

#: the kernels are instantiated for r padded to 16, 32, 64, 128 or 256
MAX_RANK = 256


def unavailable_reason(build: bool = True):
    return extension_reason("cuda", build)


def check_call(device_type: str, dtype: torch.dtype) -> None:
    """Every fused dtype runs on this backend (r is checked against MAX_RANK by fused_adapter)."""
