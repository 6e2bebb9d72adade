"""torch.compile(fullgraph=True) over modules using the fused op: no graph break, same numbers; and a subset of
the float64-reference matrix (values and every gradient) run through torch.compile."""
import pytest
import torch

from adapterfuse import Adapter, AdapterConfig, fused_adapter
from helpers import check_against_reference, device_for, dtypes_for, fused_backends, make_case, tol_for

# (lead shape, d, r, activation, scale kind, skip kind, bias, sample scale): odd shapes, every skip and scale
# kind once; each in fp32 and in the backend's first half precision
COMPILE_CASES = [((3, 7), 123, 3, "gelu", "channel", "x", True, True),
                 ((1,), 48, 48, "silu", "scalar", "other", False, True),
                 ((5,), 64, 8, "relu", "float", "none", True, False)]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: f"{c[3]}-{c[4]}-{c[5]}")
@pytest.mark.parametrize("backend", fused_backends())
def test_compiled_matrix_subset_matches_float64(backend, case):
    shape, d, r, act, scale_kind, skip_kind, bias, sample = case
    dev = device_for(backend)
    for dtype in [torch.float32] + [dt for dt in dtypes_for(backend) if dt != torch.float32][:1]:
        torch._dynamo.reset()
        t, kw = make_case(shape, d, r, dtype=dtype, device=dev, activation=act, bias=bias, scale_kind=scale_kind,
                          skip_kind=skip_kind, sample=sample)
        check_against_reference(backend, t, kw, tol_for(backend, dtype),
                                fn=torch.compile(fused_adapter, fullgraph=True))


@pytest.mark.parametrize("backend", fused_backends())
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dev = device_for(backend)
    m = Adapter.from_config(32, AdapterConfig.adapter_plus(bottleneck=4, init="bert"), backend=backend).to(dev)
    m.eval()
    x = torch.randn(2, 7, 32, device=dev, requires_grad=True)

    def f(inp):
        return m(inp, skip=inp)

    compiled = torch.compile(f, fullgraph=True)  # fullgraph: any graph break raises
    y_eager, y_comp = f(x), compiled(x)
    assert torch.allclose(y_eager, y_comp, rtol=1e-6, atol=1e-6)
    params = [x, m.scale, m.down.weight, m.up.bias]
    g_eager = torch.autograd.grad(y_eager.square().sum(), params)
    g_comp = torch.autograd.grad(y_comp.square().sum(), params)
    for a, b in zip(g_eager, g_comp):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    m.train()  # drop-path draws a per-sample mask inside the compiled graph
    assert compiled(x).shape == x.shape
