"""Per-call overhead at small shapes: microseconds per call of ``fused_adapter`` and ``Adapter.forward`` against
the eager reference, forward (no grad) and training (forward + backward), as M grows. At these shapes the
kernels take a few microseconds and what is measured is dispatch: argument checks, backend resolution, the
autograd wrapper. The fused op must stay within 1.2x of eager at the smallest shapes and win from there up
(issue 14); on a GPU the same calls are also launch-bound, so the figure is the floor of every small batch.

Timing: ``n`` back-to-back calls per sample (a CUDA synchronise only at the end of a sample), the median over
samples, in microseconds per call. Inputs are not rotated: the point is the fixed cost, not the bytes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .timing import as_step, interleaved_seconds

#: (M, d) of the overhead sweep, r = 8: serving-size batches of ViT/BERT-sized and tiny models
SHAPES = ((1, 64), (4, 64), (16, 64), (64, 64), (1, 768), (16, 768), (64, 768), (256, 768))
QUICK_SHAPES = ((1, 64), (16, 64), (64, 768))


def per_call_us(fns: Dict[str, Callable[[], object]], device: torch.device, *, quick: bool = False) -> Dict[str, float]:
    """For each fn: the median over samples of the mean time of one call in a burst of back-to-back calls, in
    microseconds, the variants' bursts interleaved (timing.interleaved_seconds)."""
    n = 50 if quick else 200
    secs = interleaved_seconds(fns, device, burst=n, samples=7 if quick else 15, warm_calls=n)
    return {k: v * 1e6 for k, v in secs.items()}


def _fused_backend(device: torch.device) -> Optional[str]:
    import adapterfuse

    have = adapterfuse.available_backends()
    for name in (("triton", "cuda") if device.type == "cuda" else ("cpu",)):
        if name in have:
            return name
    return None


def run_overhead_benchmark(device: torch.device, *, shapes: Sequence = None, r: int = 8, quick: bool = False,
                           dtype: Optional[torch.dtype] = None, log: Callable[[str], None] = print) -> List[dict]:
    """Rows {M, d, r, dtype, mode, variant, us, ratio_vs_eager}; variants: fused_<backend> (fused_adapter),
    module_<backend> (Adapter.forward), eager (the reference chain, adapter_reference)."""
    from ..modules import Adapter
    from ..functional import fused_adapter
    from ..reference import adapter_reference

    backend = _fused_backend(device)
    if backend is None:
        log("  overhead: no fused backend runs here, skipped")
        return []
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    rows: List[dict] = []
    for m, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        mod = Adapter(d, r, activation="gelu", backend=backend).to(device=device, dtype=dtype)
        with torch.no_grad():  # non-zero up-projection, so the adapter does real work
            mod.up.weight.copy_(torch.randn(mod.up.weight.shape, generator=g) * 0.02)
        x = torch.randn(m, d, generator=g).to(device=device, dtype=dtype)
        params = (mod.down.weight, mod.down.bias, mod.up.weight, mod.up.bias)

        def call(name, grad):
            xi = x.detach().requires_grad_(grad)
            if name == "eager":
                f = lambda: adapter_reference(xi, *params, skip=xi)  # noqa: E731
            elif name == "fused":
                f = lambda: fused_adapter(xi, *params, skip=xi, backend=backend)  # noqa: E731
            else:
                f = lambda: mod(xi, xi)  # noqa: E731
            return as_step(f, grad)

        for mode in ("fwd", "train"):
            us = per_call_us({label: call(name, mode == "train") for name, label in (
                ("eager", "eager"), ("fused", f"fused_{backend}"), ("module", f"module_{backend}"))}, device, quick=quick)
            for label, t in us.items():
                rows.append(dict(M=m, d=d, r=r, dtype=str(dtype).replace("torch.", ""), mode=mode, variant=label,
                                 us=round(t, 2), ratio_vs_eager=round(t / us["eager"], 3)))
            log(f"  M={m:4d} d={d:4d} {mode:5s} " + "  ".join(f"{k} {v:8.1f} us" for k, v in us.items()))
    return rows


def overhead_table(rows: List[dict]) -> str:
    from .report import text_table

    return text_table(rows, [("M", "M", "5d"), ("d", "d", "5d"), ("r", "r", "3d"), ("dtype", "dtype", "9s"),
                             ("mode", "mode", "5s"), ("variant", "variant", "13s"), ("us", "us/call", "9.1f"),
                             ("ratio_vs_eager", "xeager", "7.2f")])
