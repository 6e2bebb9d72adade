"""The adapter with its input LayerNorm and / or dropout (fused_adapter(layer_norm=..., dropout=...); docs/design.md,
LayerNorm and dropout inside the adapter): the adapter_ln_dropout op of the cpu and triton backends.

* LayerNorm: values and gradients (x, the adapter, the LayerNorm's weight and bias, scale, skip, sample_scale)
  against the float64 reference, which runs torch's LayerNorm; rows whose mean dwarfs their spread; odd shapes;
  every operand layout; fp16 / bf16 also against eager PyTorch's own error.
* Dropout: the kernels' mask is reference.dropout_keep bit for bit (so the float64 reference, given that mask,
  checks values and gradients); keep rate; masks of different seeds and of successive calls independent; the
  mask regenerated in the backward (no mask tensor is saved).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterfuse as af
from adapterfuse.reference import adapter_reference, dropout_keep
from helpers import TOL, bound, check_against_reference, device_for, dtypes_for, eager_errors, make_case, rel_err

BACKENDS = [b for b in ("cpu", "triton") if b in af.available_backends()]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no backend with LayerNorm / dropout kernels runs here")
EPS = 1e-5
SEED = 20261123


def _fn(x, w_down, b_down, w_up, b_up, ln_weight=None, ln_bias=None, ln=True, dropout=0.0, **kw):
    """fused_adapter with the case's LayerNorm and dropout (seed SEED), called like check_against_reference's fn."""
    return af.fused_adapter(x, w_down, b_down, w_up, b_up, layer_norm=(ln_weight, ln_bias, EPS) if ln else None,
                            dropout=dropout, dropout_seed=SEED, **kw)


def _ref(x, w_down, b_down, w_up, b_up, ln_weight=None, ln_bias=None, ln=True, dropout=0.0, **kw):
    """The reference given the fused op's mask (dropout_keep of SEED over x's [M, d] rows)."""
    mask = None
    if dropout > 0:
        d = x.shape[-1]
        keep = dropout_keep(SEED, x.numel() // d, d, dropout, x.device)
        mask = (keep.to(x.dtype) / (1 - dropout)).reshape(x.shape)
    return adapter_reference(x, w_down, b_down, w_up, b_up, layer_norm=(ln_weight, ln_bias, EPS) if ln else None,
                             dropout_mask=mask, **kw)


def _case(backend, shape, d, r, *, affine="both", ln=True, dropout=0.0, mean=0.0, std=1.0, dtype=torch.float32,
          seed=0, **kw):
    """make_case on the backend's device plus the LayerNorm's weight / bias (entries of t, so they get gradients)
    and the op's options in kwargs. mean / std: x's rows are mean + std * N(0, 1)."""
    dev = device_for(backend)
    t, kwargs = make_case(shape, d, r, dtype=dtype, device=dev, seed=seed, **kw)
    with torch.no_grad():
        t["x"].mul_(std).add_(mean)
    gen = torch.Generator().manual_seed(seed + 1)
    if affine in ("both", "weight"):
        t["ln_weight"] = (1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype).to(dev)
        t["ln_weight"].requires_grad_(True)
    if affine == "both":
        t["ln_bias"] = (0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype).to(dev)
        t["ln_bias"].requires_grad_(True)
    kwargs.update(ln_weight=t.get("ln_weight"), ln_bias=t.get("ln_bias"), ln=ln, dropout=dropout)
    return t, kwargs


def _check(backend, t, kw, dtype=torch.float32, tol=None):
    return check_against_reference(backend, t, kw, tol or TOL[dtype], fn=_fn, ref=_ref)


# ----------------------------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,d,r", [((1,), 1000, 48), ((199,), 123, 3), ((2, 7), 64, 16), ((3, 5), 2, 2)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_float64(backend, shape, d, r, affine):
    t, kw = _case(backend, shape, d, r, affine=affine)
    # M = 1: the sample-scale gradient is one fp32 sum of d = 1000 terms that cancel to 1/1162 of their magnitude
    # (the CPU kernel 5e-5 off, eager 7e-6): helpers.check_grad bounds it by the terms' rounding
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_of_one_channel(backend):
    """d = 1: LN(x) = 0 (+ bias) for every row; the adapter sees only b_down (the LayerNorm's weight gradient is
    0 exactly here, where float64 torch leaves 1e-15 of rounding, so it is not compared)."""
    t, kw = _case(backend, (3, 5), 1, 2, affine="none")
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu", "identity"])
@pytest.mark.parametrize("skip_kind", ["none", "x", "other"])
@pytest.mark.parametrize("scale_kind", ["float", "scalar", "channel"])
def test_layer_norm_every_activation_skip_scale(backend, activation, skip_kind, scale_kind):
    t, kw = _case(backend, (3, 11), 40, 5, activation=activation, skip_kind=skip_kind, scale_kind=scale_kind,
                  bias=skip_kind != "other")
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean,std", [(1000.0, 1.0), (-300.0, 0.01), (0.0, 1e-3)])
def test_layer_norm_rows_far_from_zero(backend, mean, std):
    """|mean| >> std: the single-pass statistics must not cancel (the Triton kernel shifts by the row's first
    element; the CPU kernel's two passes run over the cached block)."""
    t, kw = _case(backend, (4, 33), 200, 8, mean=mean, std=std)
    _check(backend, t, kw, tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_constant_rows(backend):
    """A row with zero variance normalises to 0 (rstd = 1 / sqrt(eps)): finite, as torch's LayerNorm."""
    t, kw = _case(backend, (2, 3), 50, 4)
    with torch.no_grad():
        t["x"][0, 1] = 7.0
    _check(backend, t, kw, tol=1e-4)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BACKENDS for dt in dtypes_for(b) if dt != torch.float32])
def test_layer_norm_low_precision(backend, dtype):
    """fp16 / bf16 (bf16 where the backend has it: not the Triton interpreter), also against eager's own error."""
    t, kw = _case(backend, (5, 13), 96, 8, dtype=dtype, mean=3.0)
    _check(backend, t, kw, dtype)


# ------------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_dropout_keep_bit_for_bit(backend, p):
    """With w_up = 0, b_up = 1, scale 1 and no skip, y is the mask factor itself: keep / (1 - p)."""
    dev = device_for(backend)
    m, d, r = 77, 130, 4
    x = torch.randn(m, d, device=dev)
    w_down = torch.randn(r, d, device=dev)
    w_up = torch.zeros(d, r, device=dev)
    b_up = torch.ones(d, device=dev)
    for seed in (0, 5, 2 ** 40 + 3, 2 ** 62 + 11):
        y = af.fused_adapter(x, w_down, None, w_up, b_up, dropout=p, dropout_seed=seed, backend=backend)
        keep = dropout_keep(seed, m, d, p)
        assert torch.equal(y.cpu() != 0, keep), (seed, p)
        assert torch.allclose(y.cpu()[keep], torch.full_like(y.cpu()[keep], 1 / (1 - p)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("shape,d,r", [((1,), 1000, 48), ((199,), 123, 3), ((3, 5), 40, 16)])
def test_dropout_matches_float64_given_the_mask(backend, ln, shape, d, r):
    t, kw = _case(backend, shape, d, r, ln=ln, dropout=0.3)
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip_kind", ["none", "x", "other"])
@pytest.mark.parametrize("scale_kind", ["float", "channel"])
def test_dropout_every_skip_and_scale(backend, skip_kind, scale_kind):
    t, kw = _case(backend, (4, 6), 30, 5, ln=False, dropout=0.5, skip_kind=skip_kind, scale_kind=scale_kind)
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(backend, p):
    """The fraction kept over 130k elements is 1 - p within 6 binomial standard deviations."""
    m, d = 1000, 130
    n = m * d
    keep = dropout_keep(123, m, d, p)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), frac
    dev = device_for(backend)
    y = af.fused_adapter(torch.randn(m, d, device=dev), torch.randn(2, d, device=dev), None,
                         torch.zeros(d, 2, device=dev), torch.ones(d, device=dev), dropout=p, backend=backend)
    frac = (y != 0).float().mean().item()
    assert abs(frac - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), frac


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_masks_independent_across_seeds_and_calls(backend):
    """Two masks agree on a fraction p^2 + (1 - p)^2 of the elements (independent draws), not more: across seeds,
    across rows, and across successive calls without a seed (each draws a fresh one)."""
    p, m, d = 0.5, 400, 100
    n = m * d
    expect = p * p + (1 - p) * (1 - p)
    sd = math.sqrt(expect * (1 - expect) / n)
    a, b = dropout_keep(1, m, d, p), dropout_keep(2, m, d, p)
    assert abs((a == b).float().mean().item() - expect) < 6 * sd
    shifted = (a[1:] == a[:-1]).float().mean().item()  # neighbouring rows of one mask
    assert abs(shifted - expect) < 6 * math.sqrt(expect * (1 - expect) / (n - d))
    dev = device_for(backend)
    args = (torch.randn(m, d, device=dev), torch.randn(2, d, device=dev), None, torch.zeros(d, 2, device=dev),
            torch.ones(d, device=dev))
    y1 = af.fused_adapter(*args, dropout=p, backend=backend)
    y2 = af.fused_adapter(*args, dropout=p, backend=backend)
    assert abs(((y1 != 0) == (y2 != 0)).float().mean().item() - expect) < 6 * sd
    torch.manual_seed(3)
    y3 = af.fused_adapter(*args, dropout=p, backend=backend)
    torch.manual_seed(3)
    y4 = af.fused_adapter(*args, dropout=p, backend=backend)
    assert torch.equal(y3, y4)  # torch.manual_seed reproduces the draw


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_saves_no_mask(backend):
    """The backward regenerates the mask: what autograd keeps for the op is x, h, the weights and the seed, no
    [M, d] tensor besides x."""
    t, kw = _case(backend, (64,), 96, 4, ln=False, dropout=0.5, sample=False, skip_kind="other")
    y = _fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **{k: v for k, v in kw.items()},
            backend=backend)
    saved = []
    fn = y.grad_fn
    stack = [fn]
    while stack:
        f = stack.pop()
        if f is None:
            continue
        for name in dir(f):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    v = getattr(f, name)
                except RuntimeError:
                    continue
                saved += list(v) if isinstance(v, tuple) else [v]
        stack += [g for g, _ in f.next_functions]
    big = [s for s in saved if isinstance(s, torch.Tensor) and s.numel() >= 64 * 96]
    assert all(s.data_ptr() == t["x"].data_ptr() for s in big), [tuple(s.shape) for s in big]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_zero_and_no_layer_norm_is_the_plain_adapter(backend):
    t, kw = _case(backend, (3, 9), 48, 8, ln=False, dropout=0.0)
    y = _fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw, backend=backend)
    plain = {k: v for k, v in kw.items() if k not in ("ln_weight", "ln_bias", "ln", "dropout")}
    y0 = af.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **plain, backend=backend)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_mask_on_every_backend(backend):
    """The torch reference path, the CPU kernels and the Triton kernels draw one mask for one seed."""
    t, kw = _case(backend, (2, 21), 37, 3, ln=True, dropout=0.4, skip_kind="none", sample=False)
    y = _fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw, backend=backend)
    y_ref = _fn(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw, backend="torch")
    assert torch.equal(y == 0, y_ref == 0)
    assert rel_err(y, y_ref) < 1e-5


# -------------------------------------------------------------------------------- layouts, hypothesis, misuse


@st.composite
def ln_dropout_cases(draw, backend):
    from test_layouts import ROW_LAYOUTS

    dtypes = [torch.float32, torch.float16] if backend == "triton" else dtypes_for(backend)
    return dict(b=draw(st.integers(1, 4)), t=draw(st.integers(1, 9)), d=draw(st.integers(2, 70)),
                r=draw(st.integers(1, 20)), dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(ROW_LAYOUTS)), ln=draw(st.booleans()),
                p=draw(st.sampled_from([0.0, 0.2, 0.7])), seed=draw(st.integers(0, 2 ** 31)))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_shapes_dtypes_layouts(backend, data):
    """Any shape, dtype and layout of x (transposed, sliced, stride 0, overlapping rows), with or without the
    LayerNorm and dropout: values and gradients of x (at the layout's leaf) and of the LayerNorm's weight."""
    from test_layouts import _row_layout

    c = data.draw(ln_dropout_cases(backend))
    if not c["ln"] and c["p"] == 0:
        c["ln"] = True
    dev, dt = device_for(backend), c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"])
    src, f = _row_layout(c["layout"], (c["b"], c["t"], c["d"]), gen)
    d, r = c["d"], c["r"]
    wd = torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    wu = torch.randn(d, r, generator=gen, dtype=torch.float64) / math.sqrt(r)
    lw = 1 + 0.2 * torch.randn(d, generator=gen, dtype=torch.float64)
    leaves = [v.to(dt).to(dev).requires_grad_() for v in (src, wd, wu, lw)]
    leaves64 = [v.detach().double().cpu().requires_grad_() for v in leaves]
    kw = dict(ln=c["ln"], dropout=c["p"], scale=0.5)

    def run(fn, ls, **extra):
        x = f(ls[0])
        return fn(x, ls[1], None, ls[2], None, ln_weight=ls[3], skip=x, **kw, **extra)

    y = run(_fn, leaves, backend=backend)
    y64 = run(_ref, leaves64)
    dy = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, dy.to(dt).to(dev), allow_unused=True)
    grads64 = torch.autograd.grad(y64, leaves64, dy, allow_unused=True)
    tol = TOL[dt] * (1 if dt == torch.float32 else 5)
    if c["ln"] and c["layout"] == "expand2":  # constant rows: the LayerNorm's backward scales rounding by 1/sqrt(eps)
        tol *= 100
    # or a multiple of eager PyTorch's own error in this precision (e.g. M = 1, r = 1: every w_up gradient is
    # dy times one h, a sum over d that may cancel)
    names = ("x", "w_down", "w_up", "ln_weight")
    e_rel, _ = eager_errors(lambda vals, hp: run(_ref, list(vals.values())), dict(zip(names, leaves)), names,
                            dy.to(dt).to(dev))
    assert rel_err(y, y64) < bound(tol, e_rel[0])
    for i, (name, g, g64) in enumerate(zip(names, grads, grads64), 1):
        if g64 is None or g64.abs().max() < 1e-9:  # mathematically 0 (e.g. the LN weight's on constant rows)
            assert g is None or g.abs().max() < 1e-4, name
            continue
        assert rel_err(g, g64) < bound(tol, e_rel[i]), (name, rel_err(g, g64), e_rel[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend):
    dev = device_for(backend)
    x, wd, wu = torch.randn(4, 8, device=dev), torch.randn(2, 8, device=dev), torch.randn(8, 2, device=dev)
    call = lambda **kw: af.fused_adapter(x, wd, None, wu, None, backend=backend, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="layer_norm must be None or a tuple"):
        call(layer_norm=torch.ones(8))
    with pytest.raises(ValueError, match=r"layer_norm weight must have shape \[d\] = \[8\]"):
        call(layer_norm=(torch.ones(7, device=dev), None, 1e-5))
    with pytest.raises(TypeError, match="layer_norm bias has dtype"):
        call(layer_norm=(None, torch.ones(8, dtype=torch.float64, device=dev), 1e-5))
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        call(layer_norm=(None, None, 0.0))
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        call(dropout=1.0)
    with pytest.raises(ValueError, match=r"dropout must be a probability"):
        call(dropout=-0.1)
    with pytest.raises(TypeError, match="dropout_seed must be an int"):
        call(dropout=0.1, dropout_seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dropout_seed must be >= 0"):
        call(dropout=0.1, dropout_seed=-1)


def test_cuda_backend_refuses_with_a_reason():
    """The CUDA backend has no LayerNorm / dropout kernels: forcing it says so (auto picks Triton or the
    reference). Checked on the backend object, so it runs without a GPU."""
    from adapterfuse.ops import cuda_adapter

    assert cuda_adapter.ln_dropout is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck over the adapter_ln_dropout ops: schema, fake tensors, autograd registration."""
    from adapterfuse.ops import registry

    ops = registry.get(backend).ln_dropout
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=gen).to(dev).requires_grad_()
    wd = (torch.randn(4, 24, generator=gen) * 0.2).to(dev).requires_grad_()
    wu = (torch.randn(24, 4, generator=gen) * 0.2).to(dev).requires_grad_()
    bd = torch.randn(4, generator=gen).to(dev).requires_grad_()
    seed = torch.tensor([77], dtype=torch.int64)
    for ln_eps, p in ((1e-5, 0.0), (-1.0, 0.3), (1e-5, 0.3)):
        args = (x, wd, bd, wu, None, None, 0.5, None, True, None, 1, "gelu", ln_eps, p, seed if p else None)
        torch.library.opcheck(ops.fwd, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_no_recompile_across_seeds(backend):
    """torch.compile(fullgraph=True) over a LayerNorm + dropout adapter: no graph break, the same values as
    eager for the same seed, and no recompile when the seed (a tensor) changes."""
    torch._dynamo.reset()
    t, kw = _case(backend, (2, 9), 32, 4, ln=True, dropout=0.25, sample=False, skip_kind="x")
    args = (t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["ln_weight"], t["ln_bias"])

    def f(x, wd, bd, wu, bu, lw, lb, seed):
        return af.fused_adapter(x, wd, bd, wu, bu, layer_norm=(lw, lb, EPS), dropout=0.25, dropout_seed=seed,
                                skip=x, backend=backend)

    counter = torch._dynamo.testing.CompileCounter()
    cf = torch.compile(f, fullgraph=True, backend=counter)
    for s in (1, 2, 3):
        seed = torch.tensor([s], dtype=torch.int64)
        assert torch.allclose(cf(*args, seed), f(*args, seed), atol=1e-6)
    assert counter.frame_count == 1


def test_triton_refuses_fp32_rank_above_its_limit():
    """fp32 r > 128 with the LayerNorm / dropout spills registers in the Triton backward (compile gate): forcing the
    backend raises saying so, auto runs the reference with the same values."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton does not run here")
    from adapterfuse.ops import triton_adapter

    r = triton_adapter.LN_DROPOUT_MAX_RANK_FP32 + 1
    dev = device_for("triton")
    x, wd, wu = torch.randn(3, 16, device=dev), torch.randn(r, 16, device=dev), torch.randn(16, r, device=dev)
    with pytest.raises(ValueError, match="LayerNorm / dropout in float32 for r <= 128"):
        af.fused_adapter(x, wd, None, wu, None, layer_norm=(None, None, EPS), backend="triton")
    assert triton_adapter.ln_dropout_refusal(r, torch.float16) is None
    y = af.fused_adapter(x, wd, None, wu, None, layer_norm=(None, None, EPS), dropout=0.5, dropout_seed=4,
                         backend="torch")
    mask = dropout_keep(4, 3, 16, 0.5).float() * 2
    expect = adapter_reference(x, wd, None, wu, None, layer_norm=(None, None, EPS), dropout_mask=mask)
    assert torch.allclose(y, expect)
