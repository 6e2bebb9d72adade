"""Property tests (hypothesis): random shapes, r (powers of two or not), dtypes, strides and argument
kinds; every fused backend must agree with the float64 reference on values and gradients."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (ACTIVATIONS, SCALE_KINDS, SKIP_KINDS, check_against_reference, device_for, dtypes_for,
                     fused_backends, make_case, tol_for)

BACKENDS = fused_backends()


@st.composite
def cases(draw, backend):
    lead = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
    d = draw(st.integers(1, 160))
    r = draw(st.one_of(st.integers(1, 40), st.sampled_from([16, 32, 64])))
    return dict(
        shape=tuple(lead), d=d, r=r,
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        scale_kind=draw(st.sampled_from(SCALE_KINDS)),
        skip_kind=draw(st.sampled_from(SKIP_KINDS)),
        bias=draw(st.booleans()),
        sample=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_cases_match_reference(backend):
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(cases(backend))
    def run(c):
        dev = device_for(backend)
        t, kw = make_case(c["shape"], c["d"], c["r"], dtype=c["dtype"], device=dev, activation=c["activation"],
                          bias=c["bias"], scale_kind=c["scale_kind"], skip_kind=c["skip_kind"], sample=c["sample"],
                          seed=c["seed"])
        if c["strided"]:  # the same values as a row-strided view of a wider buffer
            wide = torch.zeros(*t["x"].shape[:-1], c["d"] + 3, dtype=c["dtype"], device=dev)
            wide[..., 2:2 + c["d"]] = t["x"].detach()
            x = wide[..., 2:2 + c["d"]].requires_grad_()
            if kw["skip"] is t["x"]:
                kw["skip"] = x
            t["x"] = x
        check_against_reference(backend, t, kw, tol_for(backend, c["dtype"]))

    run()
