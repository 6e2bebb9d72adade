"""Operand layouts (issue 9, item 1): every fused backend that runs on CPU tensors must give the float64
reference's values and gradients whatever the memory layout of x, skip, the incoming gradient dy, the
weights and the scale: contiguous, transposed, sliced, with a storage offset, expanded (stride 0) along
any dim, or with overlapping rows (as_strided, unfold).

Each layout is a differentiable function of a leaf ``src``; the reference applies the same function to
``src`` in float64, so gradients are compared at the leaves (an expanded or overlapping operand sums its
gradient into the shared elements, which the comparison covers too).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterfuse
from adapterfuse.reference import adapter_reference
from helpers import (SUMMED_GRADS, bound, check_grad, cpu_backends, dtypes_for, eager_errors, rel_err, summed_terms,
                     tol_for)

BACKENDS = cpu_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend runs on CPU tensors here")

ROW_LAYOUTS = ("contiguous", "transposed", "last_dim_transposed", "sliced", "row_step", "offset",
               "expand0", "expand1", "expand2", "as_strided_overlap", "unfold")


def _row_layout(kind: str, shape, gen):
    """(src, f): a float64 leaf source and the function that turns it into a [B, T, d] operand."""
    b, t, d = shape
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if kind == "contiguous":
        return rnd(b, t, d), lambda s: s
    if kind == "transposed":
        return rnd(t, b, d), lambda s: s.transpose(0, 1)
    if kind == "last_dim_transposed":  # column stride != 1
        return rnd(d, b, t), lambda s: s.permute(1, 2, 0)
    if kind == "sliced":
        return rnd(b, t, d + 5), lambda s: s[..., 2:2 + d]
    if kind == "row_step":
        return rnd(b, 2 * t, d), lambda s: s[:, ::2]
    if kind == "offset":
        return rnd(7 + b * t * d), lambda s: s[7:].view(b, t, d)
    if kind.startswith("expand"):  # stride 0 along one dim
        dim = int(kind[-1])
        src_shape = [b, t, d]
        src_shape[dim] = 1
        return rnd(*src_shape), lambda s: s.expand(b, t, d)
    step = max(1, d // 2)  # consecutive rows overlap: row stride < d
    if kind == "as_strided_overlap":
        n = (b * t - 1) * step + d
        return rnd(n), lambda s: s.as_strided((b, t, d), (t * step, step, 1))
    if kind == "unfold":
        n = (b * t - 1) * step + d
        return rnd(n), lambda s: s.unfold(0, d, step).reshape(b, t, d) if b * t > 0 else s[:0].reshape(b, t, d)
    raise AssertionError(kind)


@st.composite
def layout_cases(draw, backend):
    return dict(
        b=draw(st.integers(1, 4)), t=draw(st.integers(1, 9)), d=draw(st.integers(1, 70)), r=draw(st.integers(1, 20)),
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        x=draw(st.sampled_from(ROW_LAYOUTS)),
        skip=draw(st.sampled_from(("none", "x") + ROW_LAYOUTS)),
        dy=draw(st.sampled_from(ROW_LAYOUTS)),
        w_down=draw(st.sampled_from(("contiguous", "transposed", "expand"))),
        w_up=draw(st.sampled_from(("contiguous", "transposed", "expand"))),
        scale=draw(st.sampled_from(("float", "channel", "channel_expand", "scalar_expand"))),
        sample=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _weight_layout(kind, rows, cols, gen, std):
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * std  # noqa: E731
    if kind == "contiguous":
        return rnd(rows, cols), lambda s: s
    if kind == "transposed":
        return rnd(cols, rows), lambda s: s.t()
    return rnd(1, cols), lambda s: s.expand(rows, cols)  # every row the same, stride 0


def _run_case(backend, c):
    gen = torch.Generator().manual_seed(c["seed"])
    b, t, d, r, dtype = c["b"], c["t"], c["d"], c["r"], c["dtype"]
    srcs, fns = {}, {}
    srcs["x"], fns["x"] = _row_layout(c["x"], (b, t, d), gen)
    if c["skip"] not in ("none", "x"):
        srcs["skip"], fns["skip"] = _row_layout(c["skip"], (b, t, d), gen)
    srcs["w_down"], fns["w_down"] = _weight_layout(c["w_down"], r, d, gen, d ** -0.5)
    srcs["w_up"], fns["w_up"] = _weight_layout(c["w_up"], d, r, gen, r ** -0.5)
    srcs["b_down"], fns["b_down"] = torch.randn(r, generator=gen, dtype=torch.float64) * 0.5, lambda s: s
    srcs["b_up"], fns["b_up"] = torch.randn(d, generator=gen, dtype=torch.float64) * 0.5, lambda s: s
    if c["scale"] == "channel":
        srcs["scale"], fns["scale"] = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5, lambda s: s
    elif c["scale"] == "channel_expand":
        srcs["scale"], fns["scale"] = torch.rand(1, generator=gen, dtype=torch.float64) + 0.5, lambda s: s.expand(d)
    elif c["scale"] == "scalar_expand":
        srcs["scale"], fns["scale"] = (torch.rand(1, 1, generator=gen, dtype=torch.float64) + 0.5,
                                       lambda s: s.expand(1, 1).reshape(1))
    if c["sample"]:
        srcs["sample_scale"], fns["sample_scale"] = torch.rand(b, generator=gen, dtype=torch.float64) + 0.25, lambda s: s
    dy_src, dy_fn = _row_layout(c["dy"], (b, t, d), gen)

    g_dtype = torch.float32  # sample_scale stays fp32, as modules pass it
    leaves = {k: v.to(g_dtype if k == "sample_scale" else dtype).requires_grad_() for k, v in srcs.items()}
    args, kw = build_from(leaves, fns, c)
    y = adapterfuse.fused_adapter(*args, **kw, backend=backend)
    # the reference sees exactly the values the fused call saw (rounded to dtype first)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    args64, kw64 = build_from(leaves64, fns, c)
    y64 = adapter_reference(*args64, **kw64)
    tol = tol_for(backend, dtype)
    dy = dy_fn(dy_src.to(dtype))
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], dy)
    dy64 = dy_fn(dy_src.to(dtype).double())
    grads64 = torch.autograd.grad(y64, [leaves64[n] for n in names], dy64)
    # eager PyTorch's own error in this precision, for the bound
    e_rel, _ = eager_errors(lambda vals, hp: _reference(build_from(vals, fns, c)), leaves, names, dy)
    err = rel_err(y, y64)
    assert err < bound(tol, e_rel[0]), f"forward rel err {err:.2e}"
    for i, (n, g, g64) in enumerate(zip(names, grads, grads64), 1):
        assert torch.isfinite(g).all(), f"grad of {n} has non-finite values"
        terms = None
        if n in SUMMED_GRADS:
            terms = summed_terms(lambda v: _reference(build_from({**leaves64, n: v}, fns, c)), leaves64[n], dy64)
        check_grad(f"{n} ({c.get(n, '')})", g, g64, bound(tol, e_rel[i]), dtype, tol, terms)


def _reference(built):
    args, kw = built
    return adapter_reference(*args, **kw)


def build_from(leaves, fns, c):
    ops = {k: fns[k](v) for k, v in leaves.items()}
    x = ops["x"]
    kw = dict(scale=ops.get("scale", 0.75), activation="gelu", sample_scale=ops.get("sample_scale"),
              skip={"none": None, "x": x}.get(c["skip"], ops.get("skip")))
    return (x, ops["w_down"], ops["b_down"], ops["w_up"], ops["b_up"]), kw


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_match_reference(backend):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(layout_cases(backend))
    def run(c):
        _run_case(backend, c)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ROW_LAYOUTS)
def test_each_layout_of_dy(backend, kind):
    """The common case of the bug: an ordinary loss hands the backward a stride-0 or overlapping dy."""
    c = dict(b=3, t=5, d=33, r=4, dtype=torch.float32, x="contiguous", skip="x", dy=kind, w_down="contiguous",
             w_up="contiguous", scale="channel", sample=True, seed=1)
    _run_case(backend, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_of_a_sum_over_rows(backend):
    """The issue's repro: the gradient of (y.sum(0) * w).sum() reaches the op as a stride-0 [M, d] tensor."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    wd = torch.randn(4, 32, requires_grad=True)
    wu = torch.randn(32, 4, requires_grad=True)
    w = torch.randn(32)
    outs = {}
    for be in (backend, "torch"):
        y = adapterfuse.fused_adapter(x, wd, None, wu, None, skip=x, backend=be)
        outs[be] = torch.autograd.grad((y.sum(0) * w).sum(), [x, wd, wu])
    for g, g_ref in zip(outs[backend], outs["torch"]):
        assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_extension_refuses_overlapping_rows(backend):
    """The C++ entry points never hand BLAS an invalid leading dimension: called directly with a
    stride-0 operand, they refuse it instead of computing garbage."""
    from adapterfuse.ops import cpu_adapter

    x = torch.randn(1, 16).expand(8, 16)
    wd, wu = torch.randn(4, 16), torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="non-overlapping rows"):
        cpu_adapter.fwd_op(x, wd, None, wu, None, None, 1.0, None, True, None, 1, "gelu")
