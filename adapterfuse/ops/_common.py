"""What every fused backend shares: the autograd formula registered on its forward custom op, the fake
(meta) implementations that let torch.compile trace them, and output allocation.

A backend provides two torch.library custom ops with these schemas (2-D views, column stride 1):

    fwd(x[M,d], w_down[r,d], b_down[r]?, w_up[d,r], b_up[d]?, scale[1|d]?, scale_value: float,
        skip[M,d]?, skip_is_x: bool, sample_scale[B]?, tokens_per_sample: int, activation: str)
        -> (y[M,d] in x.dtype, h[M,r] in float32)

    bwd(dy[M,d], x, h, w_down, b_down?, w_up, b_up?, scale?, scale_value, sample_scale?,
        tokens_per_sample, activation, skip_is_x, needs: list[bool] (7))
        -> [dx, dw_down, db_down, dw_up, db_up, dscale, dsample_scale]

``needs`` follows the order of the returned list; a gradient that is not needed comes back as an
empty tensor (custom ops cannot return None). ``h`` (the pre-activation, fp32, ``[M, r]``) is the
only activation saved for backward besides x (docs/design.md, Backward: ``u`` is never recomputed).
"""
from __future__ import annotations

import os

import torch

def as_rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` ([..., d]) as the [M, d] layout every backend takes: column stride 1 and a row stride of at
    least d, so rows never overlap and a BLAS leading dimension is always valid. A view when ``t``
    already has that layout (the normal, contiguous case: no copy); a contiguous copy otherwise
    (stride 0 from ``expand``, overlapping rows from ``unfold`` / ``as_strided``, a transposed last dim).
    Autograd hands such layouts over routinely: the gradient of ``y.sum(0)`` is a stride-0 expand."""
    t2 = t.reshape(-1, d) if t.dim() != 2 or t.shape[-1] != d else t
    if (d <= 1 or t2.stride(1) == 1) and t2.stride(0) >= max(d, 1):
        return t2
    # clone, not .contiguous(): a one-row tensor counts as contiguous whatever its row stride
    return t2.clone(memory_format=torch.contiguous_format)


def poison_enabled() -> bool:
    """ADAPTERFUSE_POISON=1 fills every kernel output with NaN before launch (tests use it so an
    element a kernel forgot to write shows up as NaN instead of stale memory)."""
    return os.environ.get("ADAPTERFUSE_POISON", "0") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def register_fakes(fwd_op, bwd_op) -> None:
    """Fake implementations: shapes and dtypes only, so torch.compile traces without running kernels."""

    @fwd_op.register_fake
    def _fwd_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                  tokens_per_sample, activation):
        m, r = x.shape[0], w_down.shape[0]
        return x.new_empty(x.shape), x.new_empty((m, r), dtype=torch.float32)

    @bwd_op.register_fake
    def _bwd_fake(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale,
                  tokens_per_sample, activation, skip_is_x, needs):
        args = (x, w_down, b_down, w_up, b_up, scale, sample_scale)
        return [a.new_empty(a.shape) if need and a is not None else x.new_empty((0,))
                for need, a in zip(needs, args)]


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the fused gradients; its backward is the error a double backward meets."""

    @staticmethod
    def forward(ctx, n, *tensors):  # tensors = the n gradients, then the tensors they depend on
        return tuple(None if g is None else g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            "adapterfuse: double backward (differentiating a gradient of a fused adapter, e.g. a gradient penalty "
            "or MAML) is not supported by the fused backends; use backend='torch' for that model")


def register_autograd(fwd_op, bwd_op):
    """Register the autograd formula of one backend on its fwd custom op itself (torch.library
    register_autograd, so torch.library.opcheck, torch.compile and torch.export see a differentiable op).
    The forward saves (x, h, weights, scale, sample_scale); the backward calls the bwd custom op asking only
    for the gradients autograd needs, and returns dy itself as the gradient of a separate skip. Returns the
    function fused_adapter calls: the op's y (h is a non-differentiable second output)."""

    def setup_context(ctx, inputs, output):
        x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens, activation = inputs
        y, h = output
        ctx.mark_non_differentiable(h)
        ctx.save_for_backward(x, h, w_down, b_down, w_up, b_up, scale, sample_scale)
        ctx.scale_value = scale_value
        ctx.skip_is_x = skip_is_x
        ctx.tokens_per_sample = tokens
        ctx.activation = activation

    def backward(ctx, dy, _dh):
        x, h, w_down, b_down, w_up, b_up, scale, sample_scale = ctx.saved_tensors
        ni = ctx.needs_input_grad
        needs = [ni[0], ni[1], ni[2], ni[3], ni[4], ni[5], ni[9]]
        dy = as_rows(dy, dy.shape[-1])
        grads = [None] * 7
        if any(needs):
            create_graph = torch.is_grad_enabled()  # backward(create_graph=True) / autograd.grad(create_graph=True)
            with torch.no_grad():
                grads = bwd_op(dy, x, h, w_down, b_down, w_up, b_up, scale, ctx.scale_value, sample_scale,
                               ctx.tokens_per_sample, ctx.activation, ctx.skip_is_x, needs)
            grads = [g if need else None for g, need in zip(grads, needs)]
            if create_graph:  # the gradients exist; differentiating them again raises a clear error
                anchors = [t for t in (dy, x, w_down, b_down, w_up, b_up, scale, sample_scale)
                           if t is not None and t.requires_grad]
                if anchors:
                    grads = list(_NoDoubleBackward.apply(len(grads), *grads, *anchors))
        dx, dwd, dbd, dwu, dbu, ds, dg = grads
        dskip = dy if ni[7] else None
        return dx, dwd, dbd, dwu, dbu, ds, None, dskip, None, dg, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)

    def fused(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens_per_sample,
              activation):
        return fwd_op(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                      tokens_per_sample, activation)[0]

    return fused
