"""The pure-torch reference: the math of docs/design.md, Math, eager and differentiable by autograd.

Every fused backend is checked against this function evaluated in float64. It is also the
``backend="torch"`` path, so it accepts any floating dtype (float64 included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import Scale, check_adapter_args, check_bank_args, check_linear_adapter_args, rows_index

__all__ = ["adapter_reference", "adapter_bank_reference", "linear_adapter_reference", "activation_fn"]


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


def adapter_bank_reference(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    adapter_index: torch.Tensor,
    *,
    scale: Scale = 1.0,
    activation: str = "gelu",
    skip: Optional[torch.Tensor] = None,
    sample_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The adapter bank: every row of x through the adapter its id names (docs/design.md, Adapter bank).

    w_down ``[A, r, d]``, b_down ``[A, r]``, w_up ``[A, d, r]``, b_up ``[A, d]``; scale a float, ``[A]`` or
    ``[A, d]``; adapter_index ``[B]`` (per sample) or ``[M]`` (per row), ids in [-1, A), -1 = no adapter
    (y = skip, or 0). A Python loop over the adapters present: the float64 oracle and the eager baseline.
    """
    shape = check_bank_args(x, w_down, b_down, w_up, b_up, adapter_index, scale, activation, skip, sample_scale)
    d = shape.d
    xf = x.reshape(-1, d)
    idx = rows_index(adapter_index, shape)
    act = activation_fn(activation)
    out = xf.new_zeros(xf.shape)
    for a in torch.unique(idx).tolist():
        if a < 0:
            continue
        rows = (idx == a).nonzero().squeeze(1)
        u = F.linear(act(F.linear(xf.index_select(0, rows), w_down[a], None if b_down is None else b_down[a])),
                     w_up[a], None if b_up is None else b_up[a])
        if isinstance(scale, torch.Tensor):
            u = u * scale[a].to(u.dtype)  # a scalar ([A]) or a [d] row ([A, d])
        else:
            u = u * float(scale)
        out = out.index_add(0, rows, u)
    out = out.reshape(x.shape)
    if sample_scale is not None:
        out = out * sample_scale.to(out.dtype).reshape([-1] + [1] * (x.dim() - 1))
    if skip is not None:
        out = skip + out
    return out


def linear_adapter_reference(
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    scale: Scale = 1.0,
    activation: str = "gelu",
    residual: Optional[torch.Tensor] = None,
    residual_position: str = "before",
) -> torch.Tensor:
    """A frozen Linear and an adapter on its output (docs/design.md, Linear + adapter), unfused:

        z = inp @ weight.T + bias
        "before":  t = z + residual;  y = t + s A(t)              (Adapter+ post: after the block's residual)
        "after":   t = z;             y = residual + t + s A(t)   (intermediate / Pfeiffer / Houlsby)

    with A(t) = act(t @ w_down.T + b_down) @ w_up.T + b_up (residual None: no residual term).
    """
    check_linear_adapter_args(inp, weight, bias, w_down, b_down, w_up, b_up, scale, activation, residual,
                              residual_position)
    t = F.linear(inp, weight, bias)
    if residual is not None and residual_position == "before":
        t = t + residual
    y = adapter_reference(t, w_down, b_down, w_up, b_up, scale=scale, activation=activation, skip=t)
    if residual is not None and residual_position == "after":
        y = residual + y
    return y
