"""The eager fast path (ops/_common.py define_adapter_ops, issue 14): in eager mode on plain tensors (and
nn.Parameters) fused_adapter calls a backend's kernels directly, without the custom-op machinery; everything
that must see the op (torch.compile / export, make_fx and other dispatch modes, tensor subclasses,
functorch transforms) gets the registered custom op. Both routes run the same kernels and the same
backward, so they agree bit for bit."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import adapterfuse as af
from adapterfuse.ops import registry
from helpers import device_for, fused_backends

CPU_RUNNABLE = [b for b in fused_backends() if device_for(b) == "cpu"]


def _args(backend, grad, dtype=torch.float32, param=False):
    g = torch.Generator().manual_seed(3)
    m, d, r = 7, 40, 6
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, wd, bd, wu, bu = mk(m, d), mk(r, d) * 0.2, mk(r), mk(d, r) * 0.2, mk(d)
    scale = torch.rand(d, generator=g)
    ts = [x, wd, bd, wu, bu, scale]
    ts = [torch.nn.Parameter(t) if param and i else t.requires_grad_(grad) for i, t in enumerate(ts)]
    x, wd, bd, wu, bu, scale = ts
    return (x, wd, bd, wu, bu, scale, 1.0, None, True, torch.tensor([0.5, 2.0, 1.0, 0.25, 1.5, 1.0, 0.75]), 1,
            "gelu")


def _op_events(fn, name):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return [e for e in prof.function_events if e.name == f"adapterfuse::{name}"]


@pytest.mark.parametrize("backend", CPU_RUNNABLE)
def test_eager_calls_skip_the_dispatcher(backend):
    mod = registry.get(backend)
    for grad in (False, True):
        args = _args(backend, grad)
        assert _op_events(lambda: mod.fused(*args), f"adapter_fwd_{backend}") == []
        # the custom op itself is a dispatcher op (what the fast path avoids)
        assert _op_events(lambda: mod.fwd_op(*args), f"adapter_fwd_{backend}") != []


@pytest.mark.parametrize("backend", CPU_RUNNABLE)
def test_fast_path_and_custom_op_agree_bitwise(backend):
    mod = registry.get(backend)
    for param in (False, True):  # nn.Parameter weights take the fast path too
        a1, a2 = _args(backend, True, param=param), _args(backend, True, param=param)
        y1 = mod.fused(*a1)
        y2 = mod.fwd_op(*a2)[0]
        assert torch.equal(y1, y2)
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        for t1, t2 in zip(a1[:6], a2[:6]):
            assert torch.equal(t1.grad, t2.grad)


@pytest.mark.parametrize("backend", CPU_RUNNABLE)
def test_tracing_sees_the_custom_op(backend):
    """Under make_fx (a dispatch mode) the fast path must not run: the traced graph holds the op, and replaying
    it gives the eager result."""
    x, wd, bd, wu, bu = _args(backend, False)[:5]

    def f(x, wd, bd, wu, bu):
        return af.fused_adapter(x, wd, bd, wu, bu, skip=x, backend=backend)

    gm = make_fx(f)(x, wd, bd, wu, bu)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any(f"adapter_fwd_{backend}" in t for t in targets), targets
    torch.testing.assert_close(gm(x, wd, bd, wu, bu), f(x, wd, bd, wu, bu), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_RUNNABLE)
def test_compiled_graph_calls_the_op(backend):
    seen = []

    def backend_fn(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    args = _args(backend, False)[:5]
    f = torch.compile(lambda x, wd, bd, wu, bu: af.fused_adapter(x, wd, bd, wu, bu, skip=x, backend=backend),
                      backend=backend_fn, fullgraph=True)
    torch.testing.assert_close(f(*args), af.fused_adapter(*args, skip=args[0], backend=backend), rtol=0, atol=0)
    assert any(f"adapter_fwd_{backend}" in t for t in seen), seen


def test_backend_resolution_is_cached_per_key(monkeypatch):
    """Eager calls resolve a (backend, device, dtype, environment) key once; a changed environment variable
    is a different key, so it still steers the next call."""
    import adapterfuse.functional as F

    calls = []
    real = F._resolve
    monkeypatch.setattr(F, "_RESOLVED", {})
    monkeypatch.setattr(F, "_resolve", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(3, 8)
    for _ in range(5):
        F.resolve_backend("auto", x)
    assert len(calls) == 1
    monkeypatch.setenv("ADAPTERFUSE_BACKEND", "torch")
    assert F.resolve_backend("auto", x) == "torch" and len(calls) == 2
