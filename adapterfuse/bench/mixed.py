"""Mixed batches: many adapters in one batch (issue 11). The adapter bank (fused_adapter_bank, one call per
direction) against the ways a batch that mixes A adapters runs without it, and against one single-adapter
fused call on the same batch (the cost the bank should stay near whatever A is):

* ``bank``: fused_adapter_bank, ids per sample or per token;
* ``single``: fused_adapter with one adapter on the whole batch (the yardstick: same rows, same bytes);
* ``loop_fused``: a Python loop over the adapters present, each a fused_adapter call on its gathered rows
  (what AdapterHub's BatchSplit and PEFT's mixed-batch ``adapter_names`` do, with our fused op inside);
* ``loop_eager``: the same loop with the eager reference (adapter_bank_reference).

Sizes: a serving batch (16 sequences of 32 tokens) and a training batch (64 x 197, ViT-B/16), d = 768,
r = 8; A in {1, 4, 16, 64}; forward (no grad) and training (forward + backward). Not yet here: AdapterHub's
BatchSplit and PEFT's ``adapter_names`` themselves (model-level), and GPU runs of the bank (no GPU bank
kernels yet).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .timing import as_step, median_ms

#: (name, B, T): B sequences of T tokens
SIZES = (("serve_16x32", 16, 32), ("train_64x197", 64, 197))
QUICK_SIZES = (("serve_16x32", 16, 32),)
ADAPTERS = (1, 4, 16, 64)
QUICK_ADAPTERS = (1, 16)


def _bank_backend(device: torch.device) -> Optional[str]:
    import adapterfuse

    if device.type == "cpu" and "cpu" in adapterfuse.available_backends():
        return "cpu"
    return None


def run_mixed_benchmark(device: torch.device, *, quick: bool = False, d: int = 768, r: int = 8,
                        dtype: torch.dtype = torch.float32, sizes=None, adapters=None,
                        log: Callable[[str], None] = print) -> List[dict]:
    """Rows {size, B, T, M, d, r, A, ids, mode, variant, ms, ratio_vs_single}."""
    from ..functional import fused_adapter, fused_adapter_bank
    from ..reference import adapter_bank_reference

    backend = _bank_backend(device)
    if backend is None:
        log(f"  mixed batches: no adapter-bank kernels for {device.type} tensors yet, skipped")
        return []
    rows: List[dict] = []
    gen = torch.Generator().manual_seed(0)
    for size, b, t in sizes or (QUICK_SIZES if quick else SIZES):
        m = b * t
        for a in adapters or (QUICK_ADAPTERS if quick else ADAPTERS):
            mk = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
            x0 = mk(b, t, d)
            wd, bd, wu, bu = mk(a, r, d, std=d ** -0.5), mk(a, r), mk(a, d, r, std=0.02), mk(a, d)
            scale = (torch.rand(a, d, generator=gen) + 0.5).to(device=device, dtype=dtype)
            for ids_kind in ("sample", "token"):
                n_ids = b if ids_kind == "sample" else m
                ids = torch.randint(0, a, (n_ids,), generator=gen).to(device)
                row_ids = ids.repeat_interleave(t) if ids_kind == "sample" else ids
                for mode in ("fwd", "train"):
                    train = mode == "train"
                    params = [p.detach().requires_grad_(train) for p in (wd, bd, wu, bu, scale)]
                    pwd, pbd, pwu, pbu, ps = params
                    x = x0.detach().requires_grad_(train)

                    def bank():
                        return fused_adapter_bank(x, pwd, pbd, pwu, pbu, ids, scale=ps, skip=x, backend=backend)

                    def single():
                        return fused_adapter(x, pwd[0], pbd[0], pwu[0], pbu[0], scale=ps[0], skip=x, backend=backend)

                    def loop_fused():
                        xf = x.reshape(m, d)
                        out = xf.clone()  # one copy, then each adapter's rows written in place
                        for i in torch.unique(row_ids).tolist():
                            sel = (row_ids == i).nonzero().squeeze(1)
                            xs = xf.index_select(0, sel)
                            ys = fused_adapter(xs, pwd[i], pbd[i], pwu[i], pbu[i], scale=ps[i], skip=xs,
                                               backend=backend)
                            out.index_copy_(0, sel, ys)
                        return out.view(x.shape)

                    def loop_eager():
                        return adapter_bank_reference(x, pwd, pbd, pwu, pbu, ids, scale=ps, skip=x)

                    ms = {}
                    for name, fn in (("bank", bank), ("single", single), ("loop_fused", loop_fused),
                                     ("loop_eager", loop_eager)):
                        ms[name] = median_ms(as_step(fn, train), device, quick=quick)
                    for name, v in ms.items():
                        rows.append(dict(size=size, B=b, T=t, M=m, d=d, r=r, A=a, ids=ids_kind, mode=mode,
                                         variant=name, dtype=str(dtype).replace("torch.", ""), ms=round(v, 4),
                                         ratio_vs_single=round(v / ms["single"], 3)))
                    log(f"  {size:13s} A={a:3d} ids/{ids_kind:6s} {mode:5s} " +
                        "  ".join(f"{k} {v:8.2f}" for k, v in ms.items()) +
                        f"   bank/single {ms['bank'] / ms['single']:.2f}x")
    return rows


def mixed_table(rows: List[dict]) -> str:
    head = f"{'size':13s} {'A':>3s} {'ids':6s} {'mode':5s} {'variant':11s} {'ms':>9s} {'xsingle':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['size']:13s} {r['A']:3d} {r['ids']:6s} {r['mode']:5s} {r['variant']:11s} {r['ms']:9.3f} "
                     f"{r['ratio_vs_single']:8.2f}")
    return "\n".join(lines)
