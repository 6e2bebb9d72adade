"""A forward and a backward of the CUDA extension backend on small odd shapes with every feature on
(bias, channel scale, sample scale, skip = x and a separate skip), for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 tools/sanitize_cuda.py
    compute-sanitizer --tool racecheck python3 tools/sanitize_cuda.py
"""
import torch

import adapterfuse

assert "cuda" in adapterfuse.available_backends(), adapterfuse.backend_status()["cuda"]
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for (m, d, r) in ((1, 123, 3), (133, 200, 5), (64, 256, 48), (70, 136, 129)):
        x = torch.randn(2, m, d, device="cuda", dtype=dtype, requires_grad=True)
        p = [torch.randn(r, d, device="cuda", dtype=dtype), torch.randn(r, device="cuda", dtype=dtype),
             torch.randn(d, r, device="cuda", dtype=dtype), torch.randn(d, device="cuda", dtype=dtype),
             torch.randn(d, device="cuda", dtype=dtype)]
        p = [t.requires_grad_() for t in p]
        g = torch.tensor([0.0, 2.0], device="cuda", requires_grad=True)
        for skip in (x, torch.randn_like(x)):
            y = adapterfuse.fused_adapter(x, *p[:4], scale=p[4], skip=skip, sample_scale=g, backend="cuda")
            torch.autograd.grad(y, [x, *p, g], torch.randn_like(y))
torch.cuda.synchronize()
print("sanitize_cuda: done")
