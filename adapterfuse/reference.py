"""The pure-torch reference: the math of docs/design.md, Math, eager and differentiable by autograd.

Every fused backend is checked against this function evaluated in float64. It is also the
``backend="torch"`` path, so it accepts any floating dtype (float64 included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import (Scale, check_adapter_args, check_bank_args, check_layer_norm, check_linear_adapter_args,
                      check_linear_layer_norm, rows_index)

__all__ = ["adapter_reference", "adapter_bank_reference", "linear_adapter_reference", "activation_fn",
           "dropout_keep", "dropout_threshold"]

_M32 = 0xFFFFFFFF
# Philox-4x32 constants (Salmon et al., SC 2011; the same as triton.language.philox and torch's CUDA RNG)
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def dropout_threshold(p: float) -> int:
    """The fused dropout's integer threshold: an element is kept when the top 24 bits of its random word are
    >= round(p * 2^24), so the keep probability is 1 - threshold / 2^24 (p to within 2^-25)."""
    return int(round(p * (1 << 24)))


def dropout_keep(seed, rows: int, d: int, p: float, device=None) -> torch.Tensor:
    """The fused adapter's dropout mask (docs/design.md, LayerNorm and dropout inside the adapter): bool [rows, d],
    True = kept.

    Element (m, c) of the [M, d] rows is kept when word c mod 4 of philox4x32-10(key = seed, counter = (c >> 2,
    m mod 2^32, m >> 32, 0)), shifted right by 8, is >= dropout_threshold(p) (one philox call gives four columns'
    words). A pure function of (seed, m, c): the kernels
    regenerate it in the backward instead of storing it, every backend draws the same mask for the same seed
    (tests hold cpu and triton to this function bit for bit), and masks of different seeds are independent.
    seed: an int, or a one-element int64 tensor (traceable: no host read).
    Computed here with int64 tensor arithmetic (32 x 32-bit products wrap in int64 but keep all 64 bits)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    nk = (d + 3) // 4
    m = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)
    c0 = torch.arange(nk, dtype=torch.int64, device=device).unsqueeze(0).expand(rows, nk)
    c1 = (m & _M32).expand(rows, nk)
    c2 = (m >> 32).expand(rows, nk)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0 = c0 * _PHILOX_ROUND_A
        p2 = c2 * _PHILOX_ROUND_B
        c0, c2 = ((p2 >> 32) & _M32) ^ c1 ^ k0, ((p0 >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = p2 & _M32, p0 & _M32
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    words = torch.stack([c0, c1, c2, c3], dim=-1).reshape(rows, 4 * nk)[:, :d]
    return (words >> 8) >= dropout_threshold(p)


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
    layer_norm=None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``skip + sample_scale[b] * dropout(scale * (act(LN(x) @ w_down.T + b_down) @ w_up.T + b_up))``.

    Shapes: x ``[..., d]``, w_down ``[r, d]``, w_up ``[d, r]``, b_down ``[r]``, b_up ``[d]``, scale a
    float / one-element tensor / ``[d]`` tensor, skip like x, sample_scale ``[B]`` with B = x.shape[0].
    layer_norm: None, or (weight, bias, eps) of the adapter's input LayerNorm (the skip stays x, unnormalised).
    dropout_mask: None, or the dropout as a factor shaped like x (0 or 1 / (1 - p); the fused op's mask is
    dropout_keep) multiplying the adapter branch.
    """
    check_adapter_args(x, w_down, b_down, w_up, b_up, scale, activation, skip, sample_scale)
    ln = check_layer_norm(layer_norm, x)
    x_in = x if ln is None else F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], ln[2])
    h = F.linear(x_in, w_down, b_down)
    u = F.linear(activation_fn(activation)(h), w_up, b_up)
    if isinstance(scale, torch.Tensor):
        out = u * scale.reshape(-1).to(u.dtype)  # [1] or [d], broadcast over the last dim
    else:
        out = u * float(scale)
    if dropout_mask is not None:
        out = out * dropout_mask.to(out.dtype)
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
    # sample_scale per row, applied to the adapters' rows only: a row without an adapter is exactly skip (its
    # sample_scale, and dy there, never meet a structural zero: inf * 0 would make NaN of y or of d_sample_scale)
    g = None if sample_scale is None else \
        sample_scale.reshape(-1, 1).expand(-1, shape.tokens_per_sample).reshape(-1)
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
        if g is not None:
            u = u * g.index_select(0, rows).to(u.dtype)[:, None]
        out = out.index_add(0, rows, u)
    out = out.reshape(x.shape)
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
    layer_norm=None,
) -> torch.Tensor:
    """A frozen Linear and an adapter on its output (docs/design.md, Linear + adapter), unfused:

        z = inp @ weight.T + bias
        "before":  t = z + residual;  y = t + s A(t)              (Adapter+ post: after the block's residual)
        "after":   t = z;             y = residual + t + s A(t)   (intermediate / Pfeiffer / Houlsby)

    with A(t) = act(t @ w_down.T + b_down) @ w_up.T + b_up (residual None: no residual term). layer_norm
    ("before" only): (weight, bias, eps) of a LayerNorm on t, t = LN(z + residual) (BERT's output block).
    """
    shape = check_linear_adapter_args(inp, weight, bias, w_down, b_down, w_up, b_up, scale, activation, residual,
                                      residual_position)
    ln = check_linear_layer_norm(layer_norm, inp, shape)
    t = F.linear(inp, weight, bias)
    if residual is not None and residual_position == "before":
        t = t + residual
    if ln is not None:
        t = F.layer_norm(t, (t.shape[-1],), ln[0], ln[1], ln[2])
    y = adapter_reference(t, w_down, b_down, w_up, b_up, scale=scale, activation=activation, skip=t)
    if residual is not None and residual_position == "after":
        y = residual + y
    return y
