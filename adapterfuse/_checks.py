"""Input validation shared by the reference and the fused op.

Every check runs before any kernel launches and names the argument and the shapes it saw
(docs/design.md, Bad input). Nothing here touches a device.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

#: activation name -> integer id used by every fused backend (constexpr in Triton, switch in C++).
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Scale = Union[float, int, torch.Tensor]


def check_backend(backend) -> str:
    """The backend name, or a ValueError naming the valid ones (raised where the name is given, not at
    the first forward)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    return backend


def as_int(name: str, value, minimum: int = 1) -> int:
    """A Python or NumPy integer >= minimum as int; bool and floats are refused with a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def as_float(name: str, value) -> float:
    """A Python or NumPy real number as float; bool, strings and tensors are refused with a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class AdapterShape:
    """What the checks learned about a call: sizes and how scale / sample_scale broadcast."""

    d: int
    r: int
    rows: int  # M = prod(x.shape[:-1])
    tokens_per_sample: int  # rows that share one sample_scale entry
    scale_kind: str  # "float", "scalar" (one-element tensor) or "channel" ([d] tensor)


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _require_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        kind = "a tensor or None" if optional else "a tensor"
        raise TypeError(f"{name} must be {kind}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_adapter_args(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Scale,
    activation: str,
    skip: Optional[torch.Tensor],
    sample_scale: Optional[torch.Tensor],
) -> AdapterShape:
    """Validate the arguments of fused_adapter / adapter_reference; raise ValueError/TypeError."""
    d, r, rows, tokens = _check_adapter_core(x, w_down, b_down, w_up, b_up, activation, skip, sample_scale, 0)
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
        raise TypeError(f"scale must be a float, a one-element tensor or a [d] tensor, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        _require_tensor("scale", scale)
        if scale.numel() == 1 and scale.dim() <= 1:
            scale_kind = "scalar"
        elif scale.dim() == 1 and scale.shape[0] == d:
            scale_kind = "channel"
        else:
            raise ValueError(
                f"scale must be a one-element tensor ([] or [1]) or a per-channel tensor [d] = [{d}], "
                f"got shape {_shape(scale)}"
            )
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}; all tensors must share one device")
    else:
        scale_kind = "float"
    return AdapterShape(d=d, r=r, rows=rows, tokens_per_sample=tokens, scale_kind=scale_kind)


def _check_adapter_core(x, w_down, b_down, w_up, b_up, activation, skip, sample_scale, lead: int):
    """The checks one adapter and an adapter bank share, on every tensor but the scale: (d, r, rows, tokens).
    lead = 0: one adapter's weights; 1: a bank's, checked per adapter (shape[1:]: no per-adapter views made)."""
    _require_tensor("x", x)
    _require_tensor("w_down", w_down)
    _require_tensor("w_up", w_up)
    _require_tensor("b_down", b_down, optional=True)
    _require_tensor("b_up", b_up, optional=True)
    _require_tensor("skip", skip, optional=True)
    _require_tensor("sample_scale", sample_scale, optional=True)

    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., d], got shape {_shape(x)}")
    d = x.shape[-1]
    wd_shape, wu_shape = w_down.shape[lead:], w_up.shape[lead:]
    if len(wd_shape) != 2 or wd_shape[1] != d:
        raise ValueError(
            f"w_down must have shape [r, d] with d = x.shape[-1] = {d} (nn.Linear(d, r).weight), "
            f"got w_down {list(wd_shape)} for x {_shape(x)}"
        )
    r = wd_shape[0]
    if r < 1:
        raise ValueError(f"the bottleneck r = w_down.shape[0] must be >= 1, got w_down {list(wd_shape)}")
    if len(wu_shape) != 2 or tuple(wu_shape) != (d, r):
        raise ValueError(
            f"w_up must have shape [d, r] = [{d}, {r}] (nn.Linear(r, d).weight), got w_up {list(wu_shape)} "
            f"with w_down {list(wd_shape)} and x {_shape(x)}"
        )
    if b_down is not None and tuple(b_down.shape[lead:]) != (r,):
        raise ValueError(f"b_down must have shape [r] = [{r}], got {list(b_down.shape[lead:])}")
    if b_up is not None and tuple(b_up.shape[lead:]) != (d,):
        raise ValueError(f"b_up must have shape [d] = [{d}], got {list(b_up.shape[lead:])}")
    if skip is not None and skip.shape != x.shape:
        raise ValueError(f"skip must have the shape of x {_shape(x)}, got {_shape(skip)}")

    # dtypes: everything that enters the matmuls or the residual must share x's dtype.
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("skip", skip)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; cast them to one dtype "
                            "(or run under torch.autocast)")

    rows = x.numel() // d if d > 0 else math.prod(x.shape[:-1])
    tokens = 1
    if sample_scale is not None:
        if x.dim() < 2:
            raise ValueError(f"sample_scale needs x of shape [B, ..., d], got x {_shape(x)}")
        if sample_scale.dim() != 1 or sample_scale.shape[0] != x.shape[0]:
            raise ValueError(
                f"sample_scale must have shape [B] = [{x.shape[0]}] (B = x.shape[0]), got {_shape(sample_scale)}"
            )
        tokens = math.prod(x.shape[1:-1])

    device = x.device
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("skip", skip),
                    ("sample_scale", sample_scale)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must share one device")
    return d, r, rows, tokens


def check_layer_norm(layer_norm, x: torch.Tensor, d: Optional[int] = None):
    """fused_adapter's / fused_linear_adapter's ``layer_norm`` argument: None, or (weight [d] | None, bias [d] |
    None, eps > 0) of a LayerNorm over the last dimension d (default x.shape[-1]); dtype and device of x. Returns
    (weight, bias, eps) or None; raises TypeError / ValueError."""
    if layer_norm is None:
        return None
    if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != 3:
        raise TypeError("layer_norm must be None or a tuple (weight, bias, eps) (weight / bias: [d] tensors or None; "
                        f"e.g. (ln.weight, ln.bias, ln.eps) of an nn.LayerNorm), got {type(layer_norm).__name__}")
    weight, bias, eps = layer_norm
    eps = as_float("layer_norm eps", eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"layer_norm eps must be a finite float > 0, got {eps!r}")
    d = x.shape[-1] if d is None else d
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _require_tensor(f"layer_norm {name}", t)
        if tuple(t.shape) != (d,):
            raise ValueError(f"layer_norm {name} must have shape [d] = [{d}] (an nn.LayerNorm(d)), got {_shape(t)}")
        if t.dtype != x.dtype:
            raise TypeError(f"layer_norm {name} has dtype {t.dtype} but the input has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"layer_norm {name} is on {t.device} but the input is on {x.device}")
    return weight, bias, eps


def check_dropout(p) -> float:
    """fused_adapter's ``dropout``: a probability in [0, 1) (0 = none)."""
    p = as_float("dropout", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r} (p = 1 drops the whole adapter branch: "
                         "pass scale=0 for that)")
    return p


@dataclass(frozen=True)
class BankShape:
    """What the checks learned about an adapter-bank call."""

    d: int
    r: int
    adapters: int  # A
    rows: int  # M
    tokens_per_sample: int  # rows per sample (prod(x.shape[1:-1]); 1 for a 1-D x): sample_scale and per-sample ids
    per_sample: bool  # the index has one id per sample (x.shape[0] of them), else one per row
    scale_kind: str  # "float", "adapter" ([A]) or "channel" ([A, d])


def check_bank_args(x, w_down, b_down, w_up, b_up, adapter_index, scale, activation, skip, sample_scale,
                    check_values: bool = True) -> BankShape:
    """Validate the arguments of fused_adapter_bank / adapter_bank_reference; raise ValueError/TypeError.
    check_values=False skips reading the ids (torch.compile: a data-dependent check; the kernels check them)."""
    for name, t in (("w_down", w_down), ("w_up", w_up)):
        _require_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be a bank [A, ...] of {'[r, d]' if name == 'w_down' else '[d, r]'} "
                             f"weights (3-D), got shape {_shape(t)}")
    _require_tensor("x", x)
    a_count = w_down.shape[0]
    if a_count < 1 or w_up.shape[0] != a_count:
        raise ValueError(f"w_down and w_up must stack the same number A >= 1 of adapters, got w_down "
                         f"{_shape(w_down)} and w_up {_shape(w_up)}")
    for name, t, per in (("b_down", b_down, "[A, r]"), ("b_up", b_up, "[A, d]")):
        _require_tensor(name, t, optional=True)
        if t is not None and (t.dim() != 2 or t.shape[0] != a_count):
            raise ValueError(f"{name} must be {per} with A = {a_count}, got {_shape(t)}")
    # everything per adapter is checked like one adapter's arguments
    d, r, m, _ = _check_adapter_core(x, w_down, b_down, w_up, b_up, activation, skip, sample_scale, 1)
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
        raise TypeError(f"scale must be a float, an [A] or an [A, d] tensor, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        _require_tensor("scale", scale)
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}; all tensors must share one device")
        if tuple(scale.shape) == (a_count,):
            scale_kind = "adapter"
        elif tuple(scale.shape) == (a_count, d):
            scale_kind = "channel"
        else:
            raise ValueError(f"scale must be a float, an [A] = [{a_count}] tensor (one per adapter) or an [A, d] = "
                             f"[{a_count}, {d}] tensor (channel scaling per adapter), got shape {_shape(scale)}")
    else:
        scale_kind = "float"
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index must be an integer tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"adapter_index must be an integer tensor (int64 or int32), got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but x is on {x.device}")
    batch = x.shape[0] if x.dim() >= 2 else m
    if adapter_index.dim() != 1 or adapter_index.shape[0] not in (batch, m):
        raise ValueError(f"adapter_index must be [B] = [{batch}] (one id per sample, B = x.shape[0]) or [M] = [{m}] "
                         f"(one id per row of x {_shape(x)}), got shape {_shape(adapter_index)}")
    per_sample = adapter_index.shape[0] == batch and x.dim() >= 2
    tokens = math.prod(x.shape[1:-1]) if x.dim() >= 2 else 1
    if check_values:
        check_bank_ids(adapter_index, a_count)
    return BankShape(d=d, r=r, adapters=a_count, rows=m, tokens_per_sample=tokens,
                     per_sample=per_sample, scale_kind=scale_kind)


def rows_index(adapter_index: torch.Tensor, shape: BankShape) -> torch.Tensor:
    """The adapter of every row of x flattened to [M, d], as a contiguous int64 [M] tensor."""
    idx = kernel_index(adapter_index)
    if shape.per_sample and shape.tokens_per_sample != 1:
        idx = idx.repeat_interleave(shape.tokens_per_sample)
    return idx


def kernel_index(adapter_index: torch.Tensor) -> torch.Tensor:
    """The index as the bank kernels take it: contiguous int64, [M] or [B] as given (they expand per-sample ids)."""
    return adapter_index.to(torch.int64).contiguous()


def check_bank_ids(adapter_index: torch.Tensor, adapters: int) -> None:
    """ValueError unless every id is in [-1, A) (one pass over the ids; one host sync on a GPU)."""
    if adapter_index.numel():
        lo, hi = (int(v) for v in torch.aminmax(adapter_index))
        if lo < -1 or hi >= adapters:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_index holds {bad}; ids must be in [-1, A) = [-1, {adapters}) (-1: no adapter)")


@dataclass(frozen=True)
class LinearAdapterShape:
    """What the checks learned about a fused_linear_adapter call: inp [..., k] -> y [..., d]."""
    k: int
    out_shape: tuple
    adapter: AdapterShape
    before: bool


RESIDUAL_POSITIONS = ("before", "after")


def check_linear_adapter_args(inp, weight, bias, w_down, b_down, w_up, b_up, scale, activation, residual,
                              residual_position) -> LinearAdapterShape:
    """Validate fused_linear_adapter / linear_adapter_reference: the frozen Linear (inp [..., k], weight [d, k],
    bias [d]), the residual (shaped like the output [..., d]) and the adapter on the Linear's output."""
    _require_tensor("inp", inp)
    _require_tensor("weight", weight)
    _require_tensor("bias", bias, optional=True)
    _require_tensor("residual", residual, optional=True)
    if residual_position not in RESIDUAL_POSITIONS:
        raise ValueError(f"residual_position must be one of {RESIDUAL_POSITIONS}, got {residual_position!r}")
    if inp.dim() < 1:
        raise ValueError(f"inp must have at least one dimension [..., k], got shape {_shape(inp)}")
    k = inp.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape [d, k] with k = inp.shape[-1] = {k} (nn.Linear(k, d).weight), "
                         f"got weight {_shape(weight)} for inp {_shape(inp)}")
    d = weight.shape[0]
    out_shape = tuple(inp.shape[:-1]) + (d,)
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias must have shape [d] = [{d}], got {_shape(bias)}")
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the Linear's output shape {list(out_shape)}, got {_shape(residual)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.dtype != inp.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but inp has dtype {inp.dtype}; cast them to one dtype "
                            "(or run under torch.autocast)")
        if t is not None and t.device != inp.device:
            raise ValueError(f"{name} is on {t.device} but inp is on {inp.device}; all tensors must share one device")
    # the adapter's own checks, on a stand-in for its input (the Linear's output): shape, dtype and device of
    # the output without allocating it
    z_like = inp.new_empty((1,)).expand(out_shape) if len(out_shape) else inp.new_empty(())
    adapter = check_adapter_args(z_like, w_down, b_down, w_up, b_up, scale, activation, None, None)
    return LinearAdapterShape(k=k, out_shape=out_shape, adapter=adapter, before=residual_position == "before")


def check_linear_layer_norm(layer_norm, inp: torch.Tensor, shape: LinearAdapterShape):
    """fused_linear_adapter's ``layer_norm``: check_layer_norm over the output's d, and only with the residual
    "before" (t = LN(z + residual), then the adapter on t: BERT's output block)."""
    ln = check_layer_norm(layer_norm, inp, shape.adapter.d)
    if ln is not None and not shape.before:
        raise ValueError("layer_norm needs residual_position='before' (t = LN(z + residual); y = t + s A(t)); "
                         "the 'after' positions have no LayerNorm between the Linear and the adapter")
    return ln
