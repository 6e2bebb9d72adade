"""torch.compile(fullgraph=True) over modules using the fused op: no graph break, same numbers."""
import pytest
import torch

from adapterfuse import Adapter, AdapterConfig
from helpers import device_for, fused_backends


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
