"""The Linear + adapter op (docs/design.md, Linear + adapter): what every backend shares. The schema, the custom
op each backend registers under it (``adapterfuse::linear_adapter_fwd_<backend>``) with its fake implementation
and autograd formula, and the eager fast path. The kernels are per backend: csrc/linear_adapter_cpu.cpp ("cpu")
and ops/triton_linear_adapter.py ("triton"); the reference is reference.linear_adapter_reference.

    fwd(inp[M,k], weight[d,k], bias[d]?, w_down[r,d], b_down[r]?, w_up[d,r], b_up[d]?, scale[1|d]?,
        scale_value: float, residual[M,d]?, residual_before: bool, activation: str, save: bool,
        ln_weight[d]?, ln_bias[d]?, ln_eps: float)
        -> (y[M,d], t[M,d] or [0], h[M,r] float32 or [0])

with z = inp weight^T + bias, t = z (+ residual when residual_before), y = t + s A(t) (+ residual when not
residual_before), h = t w_down^T + b_down. ``save`` (a gradient will be needed) makes the kernels write t and h,
the two tensors the backward reads; for inference neither is written (t then lives only on chip / in cache).
ln_eps >= 0 (residual_before only): t = LN(z + residual) with ln_weight / ln_bias (BERT's output block); that
variant is inference-only (save false: fused_linear_adapter runs the reference when a gradient is needed).

Backward, with the adapter's own backward op (no new kernels): the adapter bwd with x = t and the skip being t
gives d_t (= dy + the adapter's input gradient) and the adapter weights' gradients; then
d_inp = d_t weight, d_weight = d_t^T inp, d_bias = sum_m d_t, d_residual = d_t ("before") or dy ("after").
The frozen weight may require grad: its gradient is computed then (one more GEMM), never silently dropped.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ._common import EagerOp, _NoDoubleBackward, _plain_eager, as_rows

LINEAR_ADAPTER_FWD_SCHEMA = (
    "(Tensor inp, Tensor weight, Tensor? bias, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
    "Tensor? scale, float scale_value, Tensor? residual, bool residual_before, str activation, bool save, "
    "Tensor? ln_weight, Tensor? ln_bias, float ln_eps) -> (Tensor, Tensor, Tensor)")

_INP, _W, _B, _WD, _BD, _WU, _BU, _S, _RES, _SAVE = 0, 1, 2, 3, 4, 5, 6, 7, 9, 12
_N_ARGS = 16


def _fake(inp, weight, bias, w_down, b_down, w_up, b_up, scale, scale_value, residual, residual_before, activation,
          save, ln_weight, ln_bias, ln_eps):
    m, d, r = inp.shape[0], weight.shape[0], w_down.shape[0]
    y = inp.new_empty((m, d))
    if not save:
        return y, inp.new_empty((0,)), inp.new_empty((0,), dtype=torch.float32)
    return y, inp.new_empty((m, d)), inp.new_empty((m, r), dtype=torch.float32)


def _save(ctx, inputs, outputs) -> None:
    inp, weight, bias, w_down, b_down, w_up, b_up, scale, scale_value, residual, before, activation, save = \
        inputs[:13]
    if inputs[15] >= 0 and save:
        raise RuntimeError("adapterfuse: internal error: the Linear + adapter op's LayerNorm variant has no backward "
                           "(fused_linear_adapter runs the reference when a gradient is needed)")
    _, t, h = outputs
    ctx.save_for_backward(inp, weight, t, h, w_down, b_down, w_up, b_up, scale)
    ctx.scale_value, ctx.before, ctx.activation, ctx.saved_t = scale_value, before, activation, save


def _backward(ctx, dy, adapter_bwd) -> tuple:
    """Gradients of the 13 schema inputs from the adapter's bwd op (x = t, skip = t) and three torch GEMM/sums."""
    inp, weight, t, h, w_down, b_down, w_up, b_up, scale = ctx.saved_tensors
    ni = ctx.needs_input_grad
    if not ctx.saved_t:  # the functional entry always saves when a gradient can be needed
        raise RuntimeError("adapterfuse: internal error: fused_linear_adapter ran without saving t for a backward")
    dy = as_rows(dy, dy.shape[-1])
    need_dt = ni[_INP] or ni[_W] or ni[_B] or (ni[_RES] and ctx.before)
    needs = [need_dt, ni[_WD], ni[_BD], ni[_WU], ni[_BU], ni[_S], False]
    grads = [None] * _N_ARGS
    if any(needs) or ni[_RES]:
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            ad = adapter_bwd(dy, t, h, w_down, b_down, w_up, b_up, scale, ctx.scale_value, None, 1, ctx.activation,
                             True, needs) if any(needs) else [None] * 7
            d_t = ad[0] if need_dt else None
            grads[_INP] = d_t @ weight if ni[_INP] else None
            grads[_W] = d_t.t() @ inp if ni[_W] else None
            grads[_B] = d_t.sum(0) if ni[_B] else None
            for pos, g, need in zip((_WD, _BD, _WU, _BU, _S), ad[1:6], needs[1:6]):
                grads[pos] = g if need else None
            grads[_RES] = (d_t if ctx.before else dy) if ni[_RES] else None
        if create_graph:  # differentiating these gradients again raises a clear error
            anchors = [x for x in (dy, inp, weight, w_down, b_down, w_up, b_up, scale)
                       if x is not None and x.requires_grad]
            if anchors:
                grads = list(_NoDoubleBackward.apply(len(grads), *grads, *anchors))
    return tuple(grads)


class LinearAdapterOps(NamedTuple):
    fwd: Callable    # the linear_adapter_fwd_<backend> custom op
    fused: Callable  # what fused_linear_adapter calls: y, differentiable, on the fast path in eager mode
    #: (r, dtype) -> None, or why the kernel does not take that rank in that dtype (beyond the backend's own
    #: shape_refusal)
    refusal: Callable[[int, torch.dtype], Optional[str]]


def _takes_every_rank(r: int, dtype: torch.dtype) -> Optional[str]:
    return None


def define_linear_adapter_ops(backend: str, fwd_impl: Callable, adapter_ops,
                              refusal: Callable[[int, torch.dtype], Optional[str]] = _takes_every_rank
                              ) -> LinearAdapterOps:
    """Register the backend's Linear + adapter forward op with its fake and autograd formula (whose backward runs
    the backend's adapter bwd op, adapter_ops.bwd), and return it with the entry fused_linear_adapter calls."""
    fwd_op = torch.library.custom_op(f"adapterfuse::linear_adapter_fwd_{backend}", fwd_impl, mutates_args=(),
                                     schema=LINEAR_ADAPTER_FWD_SCHEMA)
    fwd_op.register_fake(_fake)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2])
        _save(ctx, inputs, output)

    def backward(ctx, dy, *_unused):
        return _backward(ctx, dy, adapter_ops.bwd)

    fwd_op.register_autograd(backward, setup_context=setup_context)

    def eager_backward(ctx, dy):
        return _backward(ctx, dy, adapter_ops.bwd)

    def fused(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not _plain_eager(tensors):
            return fwd_op(*args)[0]
        if args[_SAVE]:  # a gradient may be needed
            return EagerOp.apply(*args, fwd_impl, _save, eager_backward)
        return fwd_impl(*args)[0]

    return LinearAdapterOps(fwd_op, fused, refusal)
