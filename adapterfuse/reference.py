"""The pure-torch reference: the math of docs/design.md, Math, eager and differentiable by autograd.

Every fused backend is checked against this function evaluated in float64. It is also the
``backend="torch"`` path, so it accepts any floating dtype (float64 included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import Scale, check_adapter_args

__all__ = ["adapter_reference", "activation_fn"]


def activation_fn(name: str):
    """The torch function for an activation name (the same names every backend accepts)."""
    return {
        "identity": lambda h: h,
        "relu": torch.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
        "silu": F.silu,
    }[name]


def adapter_reference(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    scale: Scale = 1.0,
    activation: str = "gelu",
    skip: Optional[torch.Tensor] = None,
    sample_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``skip + sample_scale[b] * scale * (act(x @ w_down.T + b_down) @ w_up.T + b_up)``.

    Shapes: x ``[..., d]``, w_down ``[r, d]``, w_up ``[d, r]``, b_down ``[r]``, b_up ``[d]``, scale a
    float / one-element tensor / ``[d]`` tensor, skip like x, sample_scale ``[B]`` with B = x.shape[0].
    """
    check_adapter_args(x, w_down, b_down, w_up, b_up, scale, activation, skip, sample_scale)
    h = F.linear(x, w_down, b_down)
    u = F.linear(activation_fn(activation)(h), w_up, b_up)
    if isinstance(scale, torch.Tensor):
        out = u * scale.reshape(-1).to(u.dtype)  # [1] or [d], broadcast over the last dim
    else:
        out = u * float(scale)
    if sample_scale is not None:
        out = out * sample_scale.to(u.dtype).reshape([-1] + [1] * (x.dim() - 1))
    if skip is not None:
        out = skip + out
    return out
