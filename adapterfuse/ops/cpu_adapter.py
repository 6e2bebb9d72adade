"""The "cpu" backend: the fused C++ CPU kernels of csrc/adapter_cpu.cpp (row blocks kept in cache,
at::parallel_for, sgemm per block), registered as adapterfuse::adapter_fwd_cpu / adapter_bwd_cpu (ops/_common.py)
and called directly in eager mode. The extension is built on first use. Implements ops/registry.py Backend."""
from typing import Optional

import torch

from ._common import AdapterOps
from ._extension import (define_backend, define_bank_backend, define_linear_backend, define_ln_dropout_backend,
                         extension_reason)

NAME = "cpu"
MAX_RANK: Optional[int] = None  # any r: the CPU kernels are not specialised on it

fwd_op, bwd_op, fused = define_backend(NAME)
#: the adapter bank (adapterfuse::adapter_bank_fwd_cpu / _bwd_cpu; csrc/adapter_bank_cpu.cpp)
bank = define_bank_backend(NAME)
#: the adapter with its input LayerNorm and / or dropout (adapterfuse::adapter_ln_dropout_fwd_cpu / _bwd_cpu)
ln_dropout = define_ln_dropout_backend(NAME)
#: Linear + adapter (adapterfuse::linear_adapter_fwd_cpu; csrc/linear_adapter_cpu.cpp)
linear = define_linear_backend(NAME, AdapterOps(fwd_op, bwd_op, fused))


def unavailable_reason(build: bool = True) -> Optional[str]:
    return extension_reason("cpu", build)


def runs_on(device_type: str) -> bool:
    return device_type == "cpu"


def check_call(device_type: str, dtype: torch.dtype) -> None:
    """Every fused dtype runs on this backend; nothing more to refuse."""


def shape_refusal(r: int) -> Optional[str]:
    return None


def ln_dropout_refusal(r: int, dtype: torch.dtype) -> Optional[str]:
    """Every rank and dtype of the LayerNorm / dropout variant runs here."""
    return None
