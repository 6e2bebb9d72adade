"""What every fused backend shares: the adapter op's schema (written once here), the custom ops each backend
registers under it with their fake (meta) implementations and autograd formula, the eager fast path that
calls a backend's kernels without the custom-op machinery, and output allocation.

Op names are op-first and stable (they end up in serialized graphs): ``adapterfuse::adapter_fwd_<backend>``
and ``adapterfuse::adapter_bwd_<backend>`` for backend in cpu, cuda, triton. Their schemas (2-D views,
column stride 1) are ADAPTER_FWD_SCHEMA and ADAPTER_BWD_SCHEMA below:

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
from typing import Callable, NamedTuple, Optional

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


ADAPTER_FWD_SCHEMA = (
    "(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, Tensor? scale, float scale_value, "
    "Tensor? skip, bool skip_is_x, Tensor? sample_scale, SymInt tokens_per_sample, str activation) "
    "-> (Tensor, Tensor)")
ADAPTER_BWD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, Tensor? scale, "
    "float scale_value, Tensor? sample_scale, SymInt tokens_per_sample, str activation, bool skip_is_x, "
    "bool[] needs) -> Tensor[]")

# The adapter bank (docs/design.md, Adapter bank): the same arguments with every weight stacked over A adapters
# (w_down [A,r,d], b_down [A,r], w_up [A,d,r], b_up [A,d], scale [A] or [A,d]) and one more input, the adapter
# of every row: index int64 in [-1, A) (-1: no adapter, y = skip), [M] (one id per row) or [B] (one per sample of
# tokens_per_sample rows; the kernels expand it, so no [M] copy is made per call). h [M, r] is 0 on rows without one.
ADAPTER_BANK_FWD_SCHEMA = ADAPTER_FWD_SCHEMA.replace("str activation)", "str activation, Tensor index)")
ADAPTER_BANK_BWD_SCHEMA = ADAPTER_BWD_SCHEMA.replace("bool[] needs)", "bool[] needs, Tensor index)")

# The adapter with its input LayerNorm and / or dropout (docs/design.md, LayerNorm and dropout inside the adapter):
# the same arguments and three more. ln_eps >= 0: the first pass normalises x (no affine: the LayerNorm's weight and
# bias are folded into w_down and b_down by the caller, functional.fused_adapter) and the forward also returns
# stats [M, 3] fp32 (per row: a shift, the mean minus the shift, rstd; [0] without the LayerNorm: see
# docs/design.md for why a shift). dropout_p > 0: the adapter branch
# g * s * u is multiplied by keep / (1 - p), keep regenerated from seed ([1] int64 CPU tensor) by the counter-based
# hash of reference.dropout_keep in the forward and again in the backward (no mask is stored).
ADAPTER_LN_DROPOUT_FWD_SCHEMA = ADAPTER_FWD_SCHEMA.replace(
    "str activation) -> (Tensor, Tensor)",
    "str activation, float ln_eps, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)")
ADAPTER_LN_DROPOUT_BWD_SCHEMA = ADAPTER_BWD_SCHEMA.replace(
    "bool[] needs)", "bool[] needs, Tensor stats, Tensor? seed, float dropout_p)")

# positions in the forward schema
_X, _WD, _BD, _WU, _BU, _SCALE, _SKIP, _G = 0, 1, 2, 3, 4, 5, 7, 9
_FWD_ARGS = 12


def _ln_dropout_fwd_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                         tokens_per_sample, activation, ln_eps, dropout_p, seed):
    y, h = _fwd_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                     tokens_per_sample, activation)
    return y, h, x.new_empty((x.shape[0], 3) if ln_eps >= 0 else (0,), dtype=torch.float32)


def _fwd_fake(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens_per_sample,
              activation, *index):
    """Shapes and dtypes only, so torch.compile / export trace without running kernels (r is the second-to-last
    dimension of w_down: [r, d], or [A, r, d] for a bank)."""
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[-2]), dtype=torch.float32)


def _bwd_fake(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample, activation,
              skip_is_x, needs, *index):
    args = (x, w_down, b_down, w_up, b_up, scale, sample_scale)
    return [a.new_empty(a.shape) if need and a is not None else x.new_empty((0,)) for need, a in zip(needs, args)]


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


def _save(ctx, inputs, h, extra=None, extra_args=()) -> None:
    """What the backward needs: x, h, the weights, scale and sample_scale, the non-tensor arguments, and the
    tensors the op's bwd takes after the shared arguments (``extra``; default: the op's extra inputs after the
    shared twelve, the bank's index), then ``extra_args`` (non-tensors, passed to bwd last)."""
    x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens, activation = \
        inputs[:_FWD_ARGS]
    extra = inputs[_FWD_ARGS:] if extra is None else extra
    ctx.save_for_backward(x, h, w_down, b_down, w_up, b_up, scale, sample_scale, *extra)
    ctx.scale_value = scale_value
    ctx.skip_is_x = skip_is_x
    ctx.tokens_per_sample = tokens
    ctx.activation = activation
    ctx.extra_args = tuple(extra_args)
    ctx.n_extra_inputs = len(inputs) - _FWD_ARGS


def _save_ln_dropout(ctx, inputs, outputs) -> None:
    """adapter_ln_dropout: bwd takes stats (an output) and seed after needs, then dropout_p."""
    _save(ctx, inputs, outputs[1], extra=(outputs[2], inputs[_FWD_ARGS + 2]), extra_args=(inputs[_FWD_ARGS + 1],))


def _backward(ctx, dy, bwd) -> tuple:
    """The gradients of the forward schema's inputs, from ``bwd`` (the backend's bwd op or its kernels): only
    those autograd needs are computed, and dy itself is the gradient of a separate skip. The saved extras (the
    bank's index; stats and seed) and ctx.extra_args are passed on to bwd last; extra inputs get no gradient."""
    x, h, w_down, b_down, w_up, b_up, scale, sample_scale, *extra = ctx.saved_tensors
    ni = ctx.needs_input_grad
    needs = [ni[_X], ni[_WD], ni[_BD], ni[_WU], ni[_BU], ni[_SCALE], ni[_G]]
    dy = as_rows(dy, dy.shape[-1])
    grads = [None] * 7
    if any(needs):
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True) / autograd.grad(create_graph=True)
        with torch.no_grad():
            grads = bwd(dy, x, h, w_down, b_down, w_up, b_up, scale, ctx.scale_value, sample_scale,
                        ctx.tokens_per_sample, ctx.activation, ctx.skip_is_x, needs, *extra, *ctx.extra_args)
        grads = [g if need else None for g, need in zip(grads, needs)]
        if create_graph:  # the gradients exist; differentiating them again raises a clear error
            anchors = [t for t in (dy, x, w_down, b_down, w_up, b_up, scale, sample_scale)
                       if t is not None and t.requires_grad]
            if anchors:
                grads = list(_NoDoubleBackward.apply(len(grads), *grads, *anchors))
    dx, dwd, dbd, dwu, dbu, ds, dg = grads
    dskip = dy if ni[_SKIP] else None
    return (dx, dwd, dbd, dwu, dbu, ds, None, dskip, None, dg, None, None) + (None,) * ctx.n_extra_inputs


class EagerOp(torch.autograd.Function):
    """The eager path with gradients of a fused op: the backend's forward kernels called directly (no
    dispatcher, no custom-op wrapper), with the same saved tensors and the same backward as the op's registered
    autograd formula. apply(*inputs, fwd_impl, save, backward): outputs = fwd_impl(*inputs);
    save(ctx, inputs, outputs); backward(ctx, dy) -> one gradient per input; returns outputs[0]."""

    @staticmethod
    def forward(ctx, *args):
        inputs, (fwd_impl, save, backward) = args[:-3], args[-3:]
        outputs = fwd_impl(*inputs)
        save(ctx, inputs, outputs)
        ctx.backward_fn = backward
        return outputs[0]

    @staticmethod
    def backward(ctx, dy):
        return tuple(ctx.backward_fn(ctx, dy)) + (None, None, None)


def _plain_eager(tensors) -> bool:
    """True when the kernels may be called directly: eager mode on plain tensors. Anything that must see the
    op itself takes the custom op: torch.compile / export (dynamo), fake or functional tensors and other
    subclasses (nn.Parameter is plain), a dispatch mode on the stack (make_fx, FakeTensorMode, non-strict export), functorch
    transforms (vmap, grad)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TYPES:
            return False
    return True


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class AdapterOps(NamedTuple):
    fwd: Callable  # the adapter_fwd_<backend> custom op
    bwd: Callable  # the adapter_bwd_<backend> custom op
    fused: Callable  # what fused_adapter calls: y, differentiable, on the fast path in eager mode


def define_adapter_ops(backend: str, fwd_impl: Callable, bwd_impl: Callable, op: str = "adapter",
                       eager_bwd_impl: Optional[Callable] = None) -> AdapterOps:
    """Register one backend's forward and backward custom ops of `op` ("adapter"; "adapter_bank" with the
    index as one more input; "adapter_ln_dropout" with ln_eps, dropout_p and seed) under the shared schema, with their fakes and the autograd formula on the forward
    op (so torch.library.opcheck, torch.compile and torch.export see a differentiable op), and return them with
    the function the functional entry calls.

    fwd_impl / bwd_impl: the backend's kernels, taking the schema's arguments in order. In eager mode on
    plain tensors ``fused`` calls them directly: without grad as a plain call, with grad through one
    autograd.Function (issue 14: the custom-op machinery costs more than the kernel at small shapes).
    Under torch.compile / export and for tensor subclasses it calls the custom op. eager_bwd_impl: what the
    eager path's backward calls instead of bwd_impl (the same gradients; it may return them as views of one
    allocation, which the custom op may not)."""
    fwd_schema, bwd_schema = {"adapter": (ADAPTER_FWD_SCHEMA, ADAPTER_BWD_SCHEMA),
                              "adapter_bank": (ADAPTER_BANK_FWD_SCHEMA, ADAPTER_BANK_BWD_SCHEMA),
                              "adapter_ln_dropout": (ADAPTER_LN_DROPOUT_FWD_SCHEMA, ADAPTER_LN_DROPOUT_BWD_SCHEMA)}[op]
    ln_dropout = op == "adapter_ln_dropout"
    fwd_op = torch.library.custom_op(f"adapterfuse::{op}_fwd_{backend}", fwd_impl, mutates_args=(), schema=fwd_schema)
    bwd_op = torch.library.custom_op(f"adapterfuse::{op}_bwd_{backend}", bwd_impl, mutates_args=(), schema=bwd_schema)
    fwd_op.register_fake(_ln_dropout_fwd_fake if ln_dropout else _fwd_fake)
    bwd_op.register_fake(_bwd_fake)

    def save(ctx, inputs, outputs):
        if ln_dropout:
            _save_ln_dropout(ctx, inputs, outputs)
        else:
            _save(ctx, inputs, outputs[1])

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        save(ctx, inputs, output)

    fwd_op.register_autograd(lambda ctx, dy, *_rest: _backward(ctx, dy, bwd_op), setup_context=setup_context)

    def eager_backward(ctx, dy):
        return _backward(ctx, dy, eager_bwd_impl or bwd_impl)

    def fused(*args):
        x, w_down, b_down, w_up, b_up, scale, _, skip, _, sample_scale = args[:10]
        tensors = (x, w_down, b_down, w_up, b_up, scale, skip, sample_scale)
        if not _plain_eager(tensors + tuple(a for a in args[_FWD_ARGS:] if isinstance(a, torch.Tensor))):
            return fwd_op(*args)[0]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return EagerOp.apply(*args, fwd_impl, save, eager_backward)
        return fwd_impl(*args)[0]

    return AdapterOps(fwd_op, bwd_op, fused)
