"""The "cuda" backend: the hand-written CUDA kernels of csrc/adapter_kernels.cu (WMMA tensor cores for
fp16/bf16, 16-byte vector loads, deterministic two-stage weight-gradient reduction), registered as
adapterfuse::adapter_fwd_cuda / adapter_bwd_cuda (ops/_common.py) and called directly in eager mode.
The extension is built on first use (or ahead of time, see README.md). Implements ops/registry.py Backend."""
import os
from typing import Optional

import torch

from ._extension import define_backend, extension_reason
from .registry import rank_refusal

NAME = "cuda"
#: the kernels are instantiated for r padded to 16, 32, 64, 128 or 256 (csrc: kCudaMaxRank)
MAX_RANK = 256

fwd_op, bwd_op, fused = define_backend(NAME)
#: no adapter-bank kernels on this backend yet (fused_adapter_bank says so; auto runs the reference)
bank = None
#: no Linear + adapter kernel on this backend (fused_linear_adapter says so; auto picks Triton on CUDA tensors)
linear = None
#: no input-LayerNorm / dropout variant on this backend (fused_adapter says so when forced; auto picks Triton)
ln_dropout = None


def unavailable_reason(build: bool = True) -> Optional[str]:
    return extension_reason("cuda", build)


def runs_on(device_type: str) -> bool:
    """CUDA tensors; CPU tensors too under the CUDA emulation (ADAPTERFUSE_CUDA_EMULATION=1, tests only)."""
    return device_type == "cuda" or (device_type == "cpu" and os.environ.get("ADAPTERFUSE_CUDA_EMULATION") == "1")


def check_call(device_type: str, dtype: torch.dtype) -> None:
    """Every fused dtype runs on this backend."""


def shape_refusal(r: int) -> Optional[str]:
    return rank_refusal(NAME, MAX_RANK, r)


def ln_dropout_refusal(r: int, dtype: torch.dtype) -> Optional[str]:
    return "backend='cuda' has no LayerNorm / dropout kernels"
