"""The comparison harness itself (tests/helpers.py, docs/design.md Tolerances): the bounds that let ill-conditioned
results through must still refuse a wrong gradient, and their pieces compute what they claim."""
import pytest
import torch

from adapterfuse.reference import adapter_bank_reference, adapter_reference
from helpers import check_against_reference, make_bank_case, make_case, nearby, summed_terms


class _Skew(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by `factor` (a wrong gradient of one input)."""

    @staticmethod
    def forward(ctx, v, factor):
        ctx.factor = factor
        return v.view_as(v)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _wrong(ref, name, factor):
    """ref, called as check_against_reference calls a fused fn, with input `name`'s gradient off by factor."""
    positional = ("x", "w_down", "b_down", "w_up", "b_up")

    def fn(*args, backend=None, **kw):
        args = list(args)
        if name in positional:
            i = positional.index(name)
            args[i] = _Skew.apply(args[i], factor)
        else:
            kw[name] = _Skew.apply(kw[name], factor)
        return ref(*args, **kw)

    return fn


def _bank_one_row():
    """The ill-conditioned case hypothesis found: one row on adapter 4 of 5, per-adapter scale (its gradient is one
    sum of d = 62 terms cancelling to ~1/1000 of their magnitude; eager fp32 is 3e-5 off)."""
    return make_bank_case((1,), 62, 8, [4], adapters=5, activation="gelu", scale_kind="adapter", skip_kind="none",
                          sample=False, bias=False, seed=0)


def test_the_found_case_passes_as_computed():
    t, kw = _bank_one_row()
    check_against_reference("torch", t, kw, 1e-5, fn=_wrong(adapter_bank_reference, "x", 1.0),
                            ref=adapter_bank_reference)


@pytest.mark.parametrize("name,factor", [("scale", 1 + 1e-3), ("w_down", 1 + 1e-4)])
def test_a_wrong_gradient_of_the_ill_conditioned_case_is_refused(name, factor):
    t, kw = _bank_one_row()
    with pytest.raises(AssertionError, match=f"grad of {name}"):
        check_against_reference("torch", t, kw, 1e-5, fn=_wrong(adapter_bank_reference, name, factor),
                                ref=adapter_bank_reference)


@pytest.mark.parametrize("name", ["scale", "sample_scale", "w_up", "b_down"])
@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1 + 1e-4), (torch.float16, 1 + 3e-2)])
def test_a_wrong_gradient_of_an_ordinary_case_is_refused(name, dtype, factor):
    """200 rows, d = 123: a scale's gradient sums ~25k terms; one part in 10^4 off in fp32 (3 in 100 in fp16)."""
    t, kw = make_case((8, 25), 123, 16, dtype=dtype, scale_kind="scalar" if name == "scale" else "channel")
    with pytest.raises(AssertionError, match=f"grad of {name}"):
        check_against_reference("torch", t, kw, 1e-5 if dtype == torch.float32 else 1e-2,
                                fn=_wrong(adapter_reference, name, factor))


def test_summed_terms_is_the_magnitude_of_the_sample_scale_gradients_terms():
    t, kw = make_case((3, 4), 10, 2, dtype=torch.float64, skip_kind="other")
    dy = torch.randn(3, 4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = t["sample_scale"].detach().double()

    def run(v):
        return adapter_reference(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"],
                                 **dict(kw, sample_scale=v))

    branch = (run(g) - t["skip"]) / g.clamp_min(1e-300).view(-1, 1, 1)  # dy/dg_b on sample b's rows
    want = (dy * branch).abs().sum((1, 2))
    got = summed_terms(run, g, dy)
    assert got[0] == 0  # make_case drops sample 0 (g = 0): no magnitude, the plain bound applies
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-12, atol=0)
    assert (got[1:] > (dy * branch).sum((1, 2)).abs()[1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nearby_moves_each_element_by_about_one_rounding_step(dtype):
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(nearby(v, 0), v)
    w = nearby(v, 1)
    assert w.dtype == v.dtype and not torch.equal(w, v)
    # v (1 +- eps) rounded: one or two steps of the binade (a step is eps |v| / mantissa, mantissa in [1, 2))
    assert ((w.double() - v.double()).abs() <= 1.5 * torch.finfo(dtype).eps * v.double().abs()).all()
    assert not torch.equal(nearby(v, 2), w)
