"""The adapter's input LayerNorm and dropout inside the fused op (fused_adapter(layer_norm=..., dropout=...);
issue 12): what they cost on top of the plain fused adapter, against the ways they ran before.

Per shape and mode (``fwd``: no grad; ``train``: forward + backward to x, the weights and the LayerNorm's), the
variants of one AdapterHub-style sequential adapter with ``ln_before`` and dropout p = 0.1 (y = x + drop(s A(LN(x))),
x the residual too):

* ``eager``: torch's LayerNorm, the reference adapter, torch's dropout (the unfused module);
* ``ln_torch_dropout_torch``: torch's LayerNorm, the fused op, torch's dropout (no skip inside the op: the dropout
  sits between the adapter and the residual), then the residual add: what the integration could do without this op;
* ``fused``: one fused op with layer_norm and dropout;
* ``fused_plain``: the fused op without LayerNorm or dropout (the floor these two add to).

Shapes: ViT-B/16 tokens (M = 64 x 197, d = 768) and a LLaMA-width row block (M = 4096 on a GPU / 1024 on a CPU,
d = 4096), r = 8; fp32 on a CPU, bf16 on a GPU.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F

from .timing import interleaved_seconds

SHAPES = {"cuda": (("vit_b16_tokens", 64 * 197, 768), ("llama_width", 4096, 4096)),
          "cpu": (("vit_b16_tokens", 64 * 197, 768), ("llama_width", 1024, 4096))}
QUICK_SHAPES = (("small", 256, 96),)
P = 0.1
EPS = 1e-5


def run_ln_dropout_benchmark(device: torch.device, *, quick: bool = False, r: int = 8, shapes=None,
                             modes=("fwd", "train"), log: Callable[[str], None] = print) -> List[dict]:
    """Rows {shape, M, d, r, dtype, mode, variant, ms, ratio_vs_eager, ratio_vs_fused_plain}."""
    from ..functional import fused_adapter
    from ..reference import adapter_reference

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, m, d in shapes or (QUICK_SHAPES if quick else SHAPES[device.type]):
        mk = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
        x, wd, bd, wu, bu = mk(m, d), mk(r, d, std=d ** -0.5), mk(r), mk(d, r, std=0.02), mk(d)
        lw, lb = 1 + mk(d, std=0.1), mk(d, std=0.1)
        for mode in modes:
            train = mode == "train"
            leaves = [t.detach().clone().requires_grad_(train) for t in (x, wd, wu, lw, lb)]
            xl, wdl, wul, lwl, lbl = leaves
            dy = torch.ones_like(x)

            def step(fn):
                def call():
                    y = fn()
                    if train:
                        y.backward(dy)
                    return y
                return call

            fns = {
                "eager": step(lambda: xl + F.dropout(adapter_reference(F.layer_norm(xl, (d,), lwl, lbl, EPS), wdl, bd,
                                                                       wul, bu), P)),
                "ln_torch_dropout_torch": step(lambda: xl + F.dropout(fused_adapter(
                    F.layer_norm(xl, (d,), lwl, lbl, EPS), wdl, bd, wul, bu), P)),
                "fused": step(lambda: fused_adapter(xl, wdl, bd, wul, bu, skip=xl, layer_norm=(lwl, lbl, EPS),
                                                    dropout=P)),
                "fused_plain": step(lambda: fused_adapter(xl, wdl, bd, wul, bu, skip=xl)),
            }
            with torch.set_grad_enabled(train):
                secs = interleaved_seconds(fns, device, samples=5 if quick else 11, warm_calls=2)
            for variant, v in secs.items():
                rows.append(dict(shape=name, M=m, d=d, r=r, dtype=str(dtype).replace("torch.", ""), mode=mode,
                                 variant=variant, ms=round(v * 1e3, 3), ratio_vs_eager=round(v / secs["eager"], 4),
                                 ratio_vs_fused_plain=round(v / secs["fused_plain"], 4)))
            log(f"  {name:15s} {mode:5s} " + "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in secs.items()) +
                f"   fused: {secs['eager'] / secs['fused']:.2f}x eager, "
                f"{secs['fused'] / secs['fused_plain']:.2f}x the plain fused op")
    return rows


def ln_dropout_table(rows: List[dict]) -> str:
    from .report import text_table

    return text_table(rows, [("shape", "shape", "15s"), ("M", "M", "6d"), ("d", "d", "5d"), ("dtype", "dtype", "9s"),
                             ("mode", "mode", "5s"), ("variant", "variant", "23s"), ("ms", "ms", "9.2f"),
                             ("ratio_vs_eager", "xeager", "7.3f"), ("ratio_vs_fused_plain", "xplain", "7.3f")])
