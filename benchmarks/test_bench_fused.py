"""pytest-benchmark cases: each fused backend, forward and forward + backward, on the ViT-B/16 token
shape (d = 768, M = 64 * 197) at r = 8 and 32. Timings are recorded and compared by pytest-benchmark;
nothing here asserts a wall time."""
import pytest
import torch

import adapterfuse

pytest.importorskip("pytest_benchmark")

CASES = []
if torch.cuda.is_available():
    CASES += [("triton", "cuda", torch.bfloat16), ("cuda", "cuda", torch.bfloat16)]
CASES += [("cpu", "cpu", torch.float32)]


def _inputs(r, device, dtype, train):
    torch.manual_seed(0)
    M, d = 64 * 197, 768
    x = torch.randn(M, d, device=device, dtype=dtype, requires_grad=train)
    p = [torch.randn(r, d, device=device, dtype=dtype) * d ** -0.5, torch.zeros(r, device=device, dtype=dtype),
         torch.randn(d, r, device=device, dtype=dtype) * r ** -0.5, torch.zeros(d, device=device, dtype=dtype),
         torch.ones(d, device=device, dtype=dtype)]
    return x, [t.requires_grad_(train) for t in p]


@pytest.mark.parametrize("r", [8, 32])
@pytest.mark.parametrize("mode", ["fwd", "train"])
@pytest.mark.parametrize("backend,device,dtype", CASES, ids=[c[0] for c in CASES])
def test_fused_adapter(benchmark, backend, device, dtype, mode, r):
    if backend not in adapterfuse.available_backends():
        pytest.skip(f"{backend}: {adapterfuse.backend_status()[backend]}")
    train = mode == "train"
    x, (wd, bd, wu, bu, s) = _inputs(r, device, dtype, train)
    dy = torch.randn_like(x)

    def step():
        with torch.set_grad_enabled(train):
            y = adapterfuse.fused_adapter(x, wd, bd, wu, bu, scale=s, skip=x, backend=backend)
            if train:
                torch.autograd.grad(y, [x, wd, bd, wu, bu, s], dy)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(backend=backend, dtype=str(dtype), M=x.shape[0], d=x.shape[1], r=r, mode=mode)
    benchmark(step)
