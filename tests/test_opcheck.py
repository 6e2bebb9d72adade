"""Every custom op the package registers passes torch.library.opcheck (schema, autograd registration, fake
tensor, AOT dispatch) on every backend that runs on CPU here: the C++ CPU path, Triton under the interpreter
and the CUDA kernels under the emulation. The autograd formula lives on the forward op itself
(ops/_common.py register_autograd), and torch.export of a small model with fused adapters works."""
import pytest
import torch

import adapterfuse as af
from helpers import device_for, fused_backends


def _ops(backend):
    from adapterfuse.ops import registry

    mod = registry.get(backend)
    return mod.fwd_op, mod.bwd_op


def _fwd_cases(dtype):
    g = torch.Generator().manual_seed(0)

    def rnd(*s, grad=True):
        return torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)

    m, d, r = 6, 24, 5
    x, wd, bd, wu, bu = rnd(m, d), rnd(r, d), rnd(r), rnd(d, r), rnd(d)
    yield "skip is x, float scale", (x, wd, bd, wu, bu, None, 0.5, None, True, None, 1, "gelu")
    yield "separate skip, channel scale, sample scale", (x, wd, None, wu, bu, rnd(d).float(), 1.0, rnd(m, d), False,
                                                          torch.rand(3, generator=g), 2, "silu")
    yield "no skip, no biases, scalar scale", (x, wd, None, wu, None, rnd(1).float(), 1.0, None, False, None, 1, "relu")


@pytest.mark.parametrize("backend", fused_backends())
def test_opcheck_forward_and_backward_ops(backend):
    if device_for(backend) != "cpu":
        pytest.skip("the GPU run covers this backend on CUDA tensors")
    fwd, bwd = _ops(backend)
    for dtype in (torch.float32, torch.float16):
        for name, args in _fwd_cases(dtype):
            torch.library.opcheck(fwd, args)
            x, wd, bd, wu, bu, scale, sv, skip, skip_is_x, g, tokens, act = [
                a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            y, h = fwd(x, wd, bd, wu, bu, scale, sv, skip, skip_is_x, g, tokens, act)
            dy = torch.randn_like(y)
            for needs in ([True] * 7, [True, False, False, True, False, False, False], [False] * 7):
                # (the gradients not needed are distinct empty tensors: custom-op outputs may not alias)
                torch.library.opcheck(bwd, (dy, x, h, wd, bd, wu, bu, scale, sv, g, tokens, act, skip_is_x, needs))


@pytest.mark.parametrize("backend", [b for b in fused_backends() if device_for(b) == "cpu"])
def test_export_a_model_with_fused_adapters(backend):
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), af.Adapter(24, 6, backend=backend), torch.nn.GELU(),
                                af.Adapter(24, 3, backend=backend))
    x = torch.randn(4, 7, 24)
    exported = torch.export.export(model, (x,))
    names = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any(f"adapterfuse.adapter_fwd_{backend}" in n for n in names), names
    torch.testing.assert_close(exported.module()(x), model(x))
