"""The reference itself: gradcheck in float64 and agreement with the math written out by hand."""
import pytest
import torch
import torch.nn.functional as F

from adapterfuse.reference import adapter_reference
from helpers import ACTIVATIONS, SCALE_KINDS, SKIP_KINDS, make_case


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
@pytest.mark.parametrize("skip_kind", SKIP_KINDS)
def test_gradcheck(activation, scale_kind, skip_kind):
    t, kw = make_case((2, 3), 5, 3, dtype=torch.float64, activation=activation, scale_kind=scale_kind,
                      skip_kind=skip_kind, sample=True)
    if activation == "relu":  # keep h away from the kink so finite differences are valid
        with torch.no_grad():
            t["b_down"].copy_(torch.tensor([3.0, -3.0, 2.5], dtype=torch.float64))
    names = [n for n, v in t.items() if v is not None]

    def f(*args):
        a = dict(zip(names, args))
        k = dict(kw)
        for key in ("scale", "sample_scale"):
            if isinstance(k[key], torch.Tensor):
                k[key] = a[key]
        k["skip"] = {"none": None, "x": a["x"], "other": a.get("skip")}[skip_kind]
        if "sample_scale" in a:
            k["sample_scale"] = a["sample_scale"].double()
        return adapter_reference(a["x"], a["w_down"], a["b_down"], a["w_up"], a["b_up"], **k)

    inputs = [t[n].double().detach().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_matches_written_out_math():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    wd, bd = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    wu, bu = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    s = torch.randn(6, dtype=torch.float64)
    g = torch.tensor([0.0, 2.0, 0.5])
    y = adapter_reference(x, wd, bd, wu, bu, scale=s, activation="gelu", skip=x, sample_scale=g)
    expected = torch.empty_like(x)
    for b in range(3):
        for t in range(4):
            h = wd @ x[b, t] + bd
            u = wu @ F.gelu(h) + bu
            expected[b, t] = x[b, t] + g[b].double() * s * u
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_scalar_scale_shapes_keep_their_gradient_shape():
    for s in (torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)):
        s = s.clone().requires_grad_()
        x = torch.randn(4, 3, dtype=torch.float64)
        y = adapter_reference(x, torch.randn(2, 3, dtype=torch.float64), None, torch.randn(3, 2, dtype=torch.float64),
                              None, scale=s)
        y.sum().backward()
        assert s.grad.shape == s.shape
