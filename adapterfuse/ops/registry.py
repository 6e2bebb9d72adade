"""The backend registry: the one interface every fused backend module implements, and where the modules are.

A backend is a module under adapterfuse.ops (imported on first use, never at package import) that provides
the attributes of ``Backend`` below. ``functional.py`` resolves a call to a backend through ``get`` and asks
it, not a table of its own, what it can run: devices (``runs_on``), dtypes (``check_call``), shapes
(``shape_refusal``) and whether it can run on this machine at all (``unavailable_reason``).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Protocol

import torch

#: backend name -> module under adapterfuse.ops
MODULES = {"triton": "triton_adapter", "cpu": "cpu_adapter", "cuda": "cuda_adapter"}


class Backend(Protocol):
    NAME: str
    #: largest bottleneck r the kernels take (None: any)
    MAX_RANK: Optional[int]
    #: adapterfuse::adapter_fwd_<NAME> / adapter_bwd_<NAME> (ops/_common.py define_adapter_ops)
    fwd_op: Callable
    bwd_op: Callable
    #: the differentiable op fused_adapter calls (the forward schema's 12 arguments -> y)
    fused: Callable
    #: the adapter-bank ops (ops/_common.py AdapterOps, op "adapter_bank"), or None where the backend has none
    bank: Optional[object]
    #: the adapter with its input LayerNorm and / or dropout (ops/_common.py AdapterOps, op "adapter_ln_dropout"),
    #: or None where the backend has none
    ln_dropout: Optional[object]
    #: the Linear + adapter ops (ops/linear_adapter.py LinearAdapterOps), or None where the backend has none
    linear: Optional[object]

    def unavailable_reason(self, build: bool = True) -> Optional[str]:
        """None when the backend can run here; else why not. build=False starts no compiler (the C++ extension
        then says ops._extension.NOT_BUILT where it would be built on first use)."""

    def runs_on(self, device_type: str) -> bool:
        """Whether tensors of this device type run on it (CPU tensors under an interpreter / emulation too)."""

    def check_call(self, device_type: str, dtype: torch.dtype) -> None:
        """Raise TypeError / ValueError for a device and dtype the backend refuses beyond the fused dtypes."""

    def ln_dropout_refusal(self, r: int, dtype: torch.dtype) -> Optional[str]:
        """None when ln_dropout takes rank r in dtype (beyond shape_refusal); else why not."""

    def shape_refusal(self, r: int) -> Optional[str]:
        """None when the kernels take a bottleneck of r; else the message a forced call raises (auto runs the
        reference instead)."""


def get(name: str) -> Backend:
    """The backend module `name` (imported now if it was not yet); KeyError for an unknown name."""
    return importlib.import_module(f"adapterfuse.ops.{MODULES[name]}")  # type: ignore[return-value]


def rank_refusal(name: str, max_rank: int, r: int) -> Optional[str]:
    """The shared wording of a rank limit, for backends whose kernels are instantiated up to max_rank."""
    if r <= max_rank:
        return None
    return (f"backend={name!r} supports a bottleneck r <= {max_rank}, got r = {r}; use backend='torch' (or 'auto', "
            "which falls back to it) for larger r" + (", or backend='cpu' on CPU tensors" if name != "cpu" else ""))
