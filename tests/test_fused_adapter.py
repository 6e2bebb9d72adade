"""Values and every gradient of each fused backend against the float64 reference.

Runs for every backend available here: "triton" (under the interpreter on CPU, or on a GPU), and the
C++ "cpu" / "cuda" backends once built. Shapes stay small so the interpreter finishes in minutes.
"""
import itertools

import pytest
import torch

import adapterfuse
from helpers import (ACTIVATIONS, GRAD_ARGS, SCALE_KINDS, SKIP_KINDS, check_against_reference, device_for,
                     dtypes_for, fused_backends, make_case, rel_err, tol_for)

BACKENDS = fused_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend available")

MATRIX = list(itertools.product(ACTIVATIONS, SCALE_KINDS, SKIP_KINDS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,scale_kind,skip_kind", MATRIX)
def test_matrix_fp32(backend, activation, scale_kind, skip_kind):
    """Every activation x scale kind x skip kind; bias and sample_scale alternate over the matrix so
    each of their four combinations meets every activation."""
    i = MATRIX.index((activation, scale_kind, skip_kind))
    t, kw = make_case((3, 37), 70, 5, device=device_for(backend), activation=activation, bias=i % 2 == 0,
                      scale_kind=scale_kind, skip_kind=skip_kind, sample=(i // 2) % 2 == 0, seed=i)
    check_against_reference(backend, t, kw, tol_for(backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,sample", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_and_sample_scale(backend, bias, sample, activation):
    t, kw = make_case((4, 9), 33, 3, device=device_for(backend), activation=activation, bias=bias,
                      sample=sample, scale_kind="channel", skip_kind="other")
    check_against_reference(backend, t, kw, tol_for(backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
def test_low_precision(backend, activation, scale_kind):
    for dtype in dtypes_for(backend)[1:]:
        t, kw = make_case((2, 50), 96, 8, dtype=dtype, device=device_for(backend), activation=activation,
                          scale_kind=scale_kind, skip_kind="x")
        check_against_reference(backend, t, kw, tol_for(backend, dtype))


# Odd shapes of the issue: M = 0, 1, 199; d = 1, 123, 1000; r = 1, 3, 8, 48 (each value at least once,
# the large d with the large r) plus r up to 256.
SHAPES = [((0,), 123, 3), ((1,), 1, 1), ((1,), 123, 8), ((199,), 123, 3), ((199,), 1, 48), ((1, 199), 1000, 48),
          ((3, 5), 1000, 1), ((2, 0, 7), 16, 4), ((199,), 64, 256), ((7, 3), 17, 129), ((5,), 123, 48)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,d,r", SHAPES)
def test_odd_shapes(backend, shape, d, r):
    t, kw = make_case(shape, d, r, device=device_for(backend), activation="gelu", scale_kind="channel",
                      skip_kind="x", sample=True, seed=d + r)
    check_against_reference(backend, t, kw, tol_for(backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", [("x",), ("w_down", "w_up"), ("b_down", "b_up"), ("scale",), ("sample_scale",),
                                   ("skip",), ("w_down", "b_up", "scale", "sample_scale"), ()])
def test_gradient_subsets(backend, grads):
    """Only the requested gradients are computed; the others stay None and the values still match."""
    t, kw = make_case((2, 21), 40, 6, device=device_for(backend), skip_kind="other", grads=grads)
    check_against_reference(backend, t, kw, tol_for(backend, torch.float32))
    y = adapterfuse.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    if grads:
        y.sum().backward()
        for name in GRAD_ARGS:
            if name in t and t[name] is not None:
                assert (t[name].grad is not None) == (name in grads), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_inference(backend):
    t, kw = make_case((2, 11), 24, 4, device=device_for(backend))
    with torch.no_grad():
        y = adapterfuse.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
        ref = adapterfuse.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend="torch", **kw)
    assert y.grad_fn is None
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Row-strided views (kept as views), transposed x (copied), transposed weights, strided dy."""
    dev = device_for(backend)
    d, r = 45, 7
    t, kw = make_case((4, 13), d, r, device=dev, skip_kind="other", seed=3)
    big = torch.randn(4, 13, 2 * d, dtype=torch.float64).float().to(dev)
    t["x"] = big[..., 5:5 + d].detach().requires_grad_()                  # row stride 2d, column stride 1
    t["w_down"] = torch.randn(d, r).t().to(dev).requires_grad_()          # [r, d] view of a [d, r] tensor
    t["w_up"] = (torch.randn(r, d) / r ** 0.5).t().to(dev).requires_grad_()
    t["skip"] = torch.randn(13, 4, d).transpose(0, 1).to(dev).requires_grad_()  # non-viewable as [M, d]
    kw["skip"] = t["skip"]
    assert not t["x"].is_contiguous() and not t["w_down"].is_contiguous() and not t["skip"].is_contiguous()
    dy = torch.randn(4, 13, 2 * d, dtype=torch.float64).to(dev)[..., :d]
    check_against_reference(backend, t, kw, tol_for(backend, torch.float32), dy=dy.float())
    # x transposed so that its last dim has stride != 1
    xt = torch.randn(d, 9).to(dev).t().requires_grad_()
    t2, kw2 = make_case((9,), d, r, device=dev, skip_kind="none", sample=False)
    t2["x"] = xt
    check_against_reference(backend, t2, kw2, tol_for(backend, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    for act in ACTIVATIONS:
        t, kw = make_case((2, 5), 20, 3, device=device_for(backend), activation=act, skip_kind="none",
                          sample=False, grads=())
        t["x"][0, 1, 3] = float("nan")
        y = adapterfuse.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
        assert torch.isnan(y[0, 1]).all(), act  # the whole row sees the NaN through the bottleneck
        assert not torch.isnan(y[1]).any() and not torch.isnan(y[0, 0]).any(), act


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    t, kw = make_case((3, 70), 50, 8, device=device_for(backend), skip_kind="x")
    names = [n for n, v in t.items() if v is not None and v.requires_grad]
    runs = []
    for _ in range(2):
        y = adapterfuse.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
        runs.append(torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y)))
    for n, a, b in zip(names, *runs):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_is_x_same_as_separate_copy(backend):
    """skip=x (read once) and skip=a copy of x give the same y and the same total gradient of x."""
    t, kw = make_case((2, 30), 33, 4, device=device_for(backend), skip_kind="x", sample=False)
    y1 = adapterfuse.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    (gx1,) = torch.autograd.grad(y1.sum(), [t["x"]])
    x2 = t["x"].detach().clone().requires_grad_()
    kw2 = dict(kw, skip=x2 * 1.0)
    y2 = adapterfuse.fused_adapter(x2, t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw2)
    (gx2,) = torch.autograd.grad(y2.sum(), [x2])
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6) and torch.allclose(gx1, gx2, rtol=1e-5, atol=1e-6)
