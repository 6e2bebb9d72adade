"""The Linear + adapter op (fused_linear_adapter, docs/design.md, Linear + adapter): a frozen Linear and an
adapter on its output in one kernel. Values and every gradient against the float64 reference (the unfused
F.linear + adapter), both residual positions and none, odd shapes, every activation / scale kind, dtypes
(fp16 / bf16 also bounded by eager PyTorch's own error), layouts, the frozen weight with and without
requires_grad, the inference path (nothing saved) equal to the training path, bad input, opcheck, compile."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterfuse as af
from helpers import (ACTIVATIONS, LINEAR_FN, LINEAR_REF, TOL, check_against_reference, device_for, dtypes_for,
                     make_linear_case, rel_err)


def linear_backends():
    """Backends with a Linear + adapter kernel that run here (the reference is the oracle, not a subject)."""
    return [b for b in ("cpu", "triton") if b in af.available_backends()]


BACKENDS = linear_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no backend with a Linear + adapter kernel runs here")


def _case(backend, *args, **kwargs):
    return make_linear_case(*args, device=device_for(backend), **kwargs)


def _check(backend, t, kw, dtype=torch.float32):
    return check_against_reference(backend, t, kw, TOL[dtype], fn=LINEAR_FN, ref=LINEAR_REF)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", ["before", "after", "none"])
@pytest.mark.parametrize("shape,k,d,r", [((1,), 7, 123, 3), ((199,), 33, 16, 48), ((3, 5), 64, 1000, 8),
                                         ((2, 3), 1, 5, 1)])
def test_matches_float64(backend, residual, shape, k, d, r):
    t, kw = _case(backend, shape, k, d, r, residual=residual, seed=r)
    _check(backend, t, kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["before", "after"])
def test_cpu_chunks(dtype, residual):
    """More rows than one chunk of the C++ kernel (8 MiB of fp32 t per sgemm: 4096 rows at d = 512, 64-row
    adapter blocks): three chunks, the last partial, values and gradients."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension does not run here")
    t, kw = make_linear_case((9000,), 20, 512, 5, dtype=dtype, residual=residual)
    _check("cpu", t, kw, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("scale_kind", ["float", "scalar", "channel"])
def test_every_activation_and_scale(backend, activation, scale_kind):
    t, kw = _case(backend, (4, 9), 24, 40, 6, activation=activation, scale_kind=scale_kind, residual="after",
                  bias=scale_kind != "float", linear_bias=scale_kind != "scalar")
    _check(backend, t, kw)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BACKENDS for dt in dtypes_for(b) if dt != torch.float32])
@pytest.mark.parametrize("residual", ["before", "after"])
def test_half_precision_matches_float64(backend, dtype, residual):
    t, kw = _case(backend, (5, 13), 48, 96, 8, dtype=dtype, residual=residual)
    _check(backend, t, kw, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_that_requires_grad_gets_its_gradient(backend):
    """The Linear's weight and bias are frozen in use, but one that requires grad gets its gradient, never None."""
    t, kw = _case(backend, (6, 7), 20, 30, 4, residual="before", frozen=False)
    assert t["weight"].requires_grad and t["bias"].requires_grad
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    """A transposed inp, a non-contiguous (sliced) weight, a stride-0 (expanded) residual."""
    t, kw = _case(backend, (6, 5), 24, 40, 4, residual="after")
    dev = t["x"].device
    t["x"] = t["x"].detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_()
    wide = torch.randn(40, 30, device=dev)
    wide[:, 2:26] = t["weight"].detach()
    t["weight"] = kw["weight"] = wide[:, 2:26]
    t["residual"] = kw["residual"] = torch.randn(1, 5, 40, device=dev).expand(6, 5, 40).requires_grad_()
    assert t["x"].stride(-1) != 1 and not t["weight"].is_contiguous()
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_residual_rows(backend):
    """A residual whose rows overlap (as_strided): copied into the kernels' row layout, values and gradients still
    match float64."""
    t, kw = _case(backend, (6, 5), 12, 16, 3, residual="before")
    base = torch.randn(6 * 5 + 16, device=t["x"].device)
    res = base.as_strided((6, 5, 16), (5, 1, 1)).requires_grad_()  # neighbouring rows share 15 elements
    t["residual"] = kw["residual"] = res
    _check(backend, t, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", ["before", "after"])
def test_inference_path_equals_training_path(backend, residual):
    """Without gradients the kernel writes neither t nor h (t stays on chip / in cache); y is bit-identical."""
    t, kw = _case(backend, (7, 3), 16, 24, 5, residual=residual)
    y_train = LINEAR_FN(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    with torch.no_grad():
        y_infer = LINEAR_FN(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    assert y_train.requires_grad and not y_infer.requires_grad
    assert torch.equal(y_train.detach(), y_infer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_scale_matches_reference(backend):
    """An inf in the channel scale: applied after u (as the reference does), not folded into w_up."""
    t, kw = _case(backend, (3, 4), 8, 6, 2, residual="before")
    scale = t["scale"].detach().clone()
    scale[2] = float("inf")
    args = [t[n].detach() for n in ("x", "w_down", "b_down", "w_up", "b_up")]
    kw = dict(kw, scale=scale, residual=t["residual"].detach(), weight=t["weight"].detach(), bias=t["bias"].detach())
    y = LINEAR_FN(*args, backend=backend, **kw)
    ref = LINEAR_REF(*args, **kw)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_random_cases_match_float64(backend, data):
    lead = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=2))
    k, d, r = data.draw(st.integers(1, 70)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 20))
    dtype = data.draw(st.sampled_from(dtypes_for(backend)))
    t, kw = _case(backend, tuple(lead), k, d, r, dtype=dtype,
                  activation=data.draw(st.sampled_from(ACTIVATIONS)),
                  scale_kind=data.draw(st.sampled_from(["float", "scalar", "channel"])),
                  residual=data.draw(st.sampled_from(["before", "after", "none"])),
                  bias=data.draw(st.booleans()), linear_bias=data.draw(st.booleans()),
                  frozen=data.draw(st.booleans()), seed=data.draw(st.integers(0, 999)))
    _check(backend, t, kw, dtype)


def test_bad_input_is_named():
    t, kw = make_linear_case((3,), 4, 6, 2, residual="before")
    args = [t[n].detach() for n in ("x", "weight", "bias", "w_down", "b_down", "w_up", "b_up")]
    x, w, b, wd, bd, wu, bu = args
    with pytest.raises(ValueError, match=r"weight must have shape \[d, k\] with k = inp.shape\[-1\] = 4"):
        af.fused_linear_adapter(x, w[:, :3], b, wd, bd, wu, bu)
    with pytest.raises(ValueError, match=r"residual must have the Linear's output shape \[3, 6\]"):
        af.fused_linear_adapter(x, w, b, wd, bd, wu, bu, residual=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="residual_position must be one of"):
        af.fused_linear_adapter(x, w, b, wd, bd, wu, bu, residual_position="middle")
    with pytest.raises(ValueError, match=r"w_down must have shape \[r, d\] with d = x.shape\[-1\] = 6"):
        af.fused_linear_adapter(x, w, b, wd[:, :5], bd, wu, bu)
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        af.fused_linear_adapter(x, w, b.double(), wd, bd, wu, bu)


def test_backend_without_the_kernel_says_so():
    if "cuda" not in af.available_backends():
        pytest.skip("cuda does not run here")
    t, kw = make_linear_case((3,), 4, 6, 2, residual="before", device=device_for("cuda"))
    with pytest.raises(ValueError, match="no Linear \\+ adapter kernel"):
        LINEAR_FN(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend="cuda", **kw)


def test_triton_refuses_fp32_rank_256_and_auto_falls_back():
    from adapterfuse.ops import triton_linear_adapter as tla

    assert tla.refusal(256, torch.float32) is not None and tla.refusal(256, torch.bfloat16) is None
    assert tla.refusal(128, torch.float32) is None and tla.refusal(257, torch.float16) is not None
    if "triton" not in af.available_backends():
        pytest.skip("triton does not run here")
    t, kw = make_linear_case((2,), 4, 6, 256, residual="before", device=device_for("triton"))
    args = (t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"])
    with pytest.raises(ValueError, match="r <= 128 in torch.float32"):
        LINEAR_FN(*args, backend="triton", **kw)
    ref = LINEAR_REF(*args, **kw)
    torch.testing.assert_close(LINEAR_FN(*args, backend="auto", **kw), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from adapterfuse.ops import registry

    ops = registry.get(backend).linear
    t, kw = _case(backend, (5,), 12, 10, 3, residual="after")
    det = lambda n: t[n].detach()  # noqa: E731
    no_ln = (None, None, -1.0)
    for save in (False, True):
        args = (det("x"), det("weight"), det("bias"), det("w_down"), det("b_down"), det("w_up"), det("b_up"),
                det("scale"), 1.0, det("residual"), False, "gelu", save) + no_ln
        torch.library.opcheck(ops.fwd, args, test_utils=("test_schema", "test_faketensor"))
    ln = (torch.rand(10, device=det("x").device) + 0.5, torch.randn(10, device=det("x").device), 1e-5)
    args = (det("x"), det("weight"), det("bias"), det("w_down"), det("b_down"), det("w_up"), det("b_up"),
            det("scale"), 1.0, det("residual"), True, "gelu", False) + ln  # the LayerNorm variant (inference)
    torch.library.opcheck(ops.fwd, args, test_utils=("test_schema", "test_faketensor"))
    args = [t["x"], det("weight"), det("bias"), t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], 1.0,
            t["residual"], True, "silu", True, *no_ln]
    torch.library.opcheck(ops.fwd, tuple(args), test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    t, kw = _case(backend, (4, 6), 16, 24, 4, residual="before")
    f = torch.compile(lambda x, res: LINEAR_FN(x, t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend,
                                               **dict(kw, residual=res)), fullgraph=True)
    y = f(t["x"], t["residual"])
    ref = LINEAR_REF(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum(), [t["x"], t["w_down"], t["residual"]])
    g_ref = torch.autograd.grad(ref.sum(), [t["x"], t["w_down"], t["residual"]])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------- the LayerNorm on t (BERT's output block): t = LN(z + residual)


def _ln_case(backend, shape, k, d, r, *, dtype=torch.float32, residual="before", affine=True, mean=0.0, seed=0):
    """make_linear_case with a LayerNorm (weight / bias as kwargs) and, for inference, nothing requiring grad."""
    t, kw = make_linear_case(shape, k, d, r, dtype=dtype, device=device_for(backend), residual=residual, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    dev = device_for(backend)
    lw = (1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype).to(dev) if affine else None
    lb = (0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(dtype).to(dev) if affine else None
    with torch.no_grad():
        if t["bias"] is not None:
            t["bias"].add_(mean)
    kw["layer_norm"] = (lw, lb, 1e-5)
    return t, kw


def _ln_errors(backend, t, kw):
    """(fused's error, eager's error in the same dtype), relative to the float64 reference, inference."""
    from helpers import copy_case, to_double

    with torch.no_grad():
        y = LINEAR_FN(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw, backend=backend)
        t64, k64 = to_double(t, kw)
        ln = kw["layer_norm"]
        k64["layer_norm"] = tuple(None if v is None else v.double() for v in ln[:2]) + (ln[2],)
        y64 = LINEAR_REF(t64["x"], t64["w_down"], t64["b_down"], t64["w_up"], t64["b_up"], **k64)
        te, ke = copy_case(t, kw)
        ye = LINEAR_REF(te["x"], te["w_down"], te["b_down"], te["w_up"], te["b_up"], **ke)
    assert y.shape == y64.shape and y.dtype == t["x"].dtype
    return rel_err(y, y64), rel_err(ye, y64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,k,d,r", [((1,), 7, 123, 3), ((199,), 33, 16, 48), ((3, 5), 64, 1000, 8)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_on_t_matches_float64(backend, shape, k, d, r, affine):
    t, kw = _ln_case(backend, shape, k, d, r, affine=affine)
    err, eager = _ln_errors(backend, t, kw)
    assert err < max(TOL[torch.float32], 4 * eager), (err, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_on_t_without_residual_and_far_from_zero(backend):
    """No residual (t = LN(z)); and rows whose mean dwarfs their spread (the Triton kernel's shifted sums)."""
    for residual, mean in (("none", 0.0), ("before", 300.0)):
        t, kw = _ln_case(backend, (4, 9), 24, 200, 8, residual=residual, mean=mean)
        err, eager = _ln_errors(backend, t, kw)
        assert err < max(TOL[torch.float32], 4 * eager), (residual, mean, err, eager)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BACKENDS for dt in dtypes_for(b) if dt != torch.float32])
def test_layer_norm_on_t_half_precision(backend, dtype):
    t, kw = _ln_case(backend, (3, 7), 40, 96, 8, dtype=dtype)
    err, eager = _ln_errors(backend, t, kw)
    assert err < max(TOL[dtype], 4 * eager), (err, eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_on_t_with_gradients(backend):
    """The LayerNorm variant is fused for inference: with a gradient needed, auto runs the reference (every
    gradient, the LayerNorm's included, against float64) and a forced backend raises saying so."""
    t, kw = _ln_case(backend, (2, 5), 12, 40, 4)
    lw, lb, eps = kw["layer_norm"]
    lw.requires_grad_()
    with pytest.raises(ValueError, match="inference only"):
        LINEAR_FN(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw, backend=backend)
    y = LINEAR_FN(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], **kw, backend="auto")
    g = torch.autograd.grad(y.sum(), [t["x"], lw])
    xd, lwd = t["x"].detach().double().requires_grad_(), lw.detach().double().requires_grad_()
    kd = dict(kw, layer_norm=(lwd, lb.double(), eps), weight=kw["weight"].double(), bias=kw["bias"].double(),
              residual=kw["residual"].detach().double(), scale=kw["scale"].detach().double())
    y64 = LINEAR_REF(xd, *(t[n].detach().double() for n in ("w_down", "b_down", "w_up", "b_up")), **kd)
    g64 = torch.autograd.grad(y64.sum(), [xd, lwd])
    assert rel_err(y, y64) < TOL[torch.float32]
    for a, b in zip(g, g64):
        assert rel_err(a, b) < TOL[torch.float32]


def test_layer_norm_on_t_needs_residual_before():
    x, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="layer_norm needs residual_position='before'"):
        af.fused_linear_adapter(x, w, None, torch.randn(2, 6), None, torch.randn(6, 2), None,
                                residual=torch.randn(2, 6), residual_position="after", layer_norm=(None, None, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed_inp", "sliced_inp", "expanded_residual", "overlapping_residual"])
def test_layer_norm_on_t_layouts(backend, layout):
    """The LayerNorm variant over odd operand layouts: inp transposed or sliced, the residual expanded with stride 0
    or with overlapping rows (as_strided); values against float64 within 4x eager fp32's error."""
    t, kw = _ln_case(backend, (6, 5), 20, 48, 4)
    x, res = t["x"].detach(), t["residual"].detach()
    if layout == "transposed_inp":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced_inp":
        x = torch.cat([x, x[..., :7]], -1)[..., :20]
    elif layout == "expanded_residual":
        res = res[:1].expand_as(res)
    else:
        flat = res.reshape(-1)[: 30 * 2 + 48]
        res = flat.as_strided((6, 5, 48), (5 * 2, 2, 1))
    t["x"], t["residual"] = x, res
    kw["residual"] = res
    err, eager = _ln_errors(backend, t, kw)
    assert err < max(TOL[torch.float32], 4 * eager), (layout, err, eager)
