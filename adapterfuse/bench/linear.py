"""The adapter inside the frozen Linear (fused_linear_adapter, fuse_for_inference; issue 13): what an adapter
costs on top of the frozen Linear it follows, at inference.

Op level, per shape (inference, no grad; the residual add is the model's own, so every variant has it):

* ``frozen``: the Linear and the residual add (what the model computes without an adapter, e.g. ViTOutput);
* ``frozen_inplace``: the Linear, the residual added in place (one output tensor: the cheapest eager frozen);
* ``lora_merged``: the frozen computation with a merged LoRA weight (LoRA's inference cost);
* ``linear_then_adapter``: the Linear, the residual add, then the fused adapter op (two kernels);
* ``fused_linear_adapter``: one kernel (the adapter in the Linear's epilogue).

Shapes: ViT-B/16 fc2 (M = 64 x 197, k = 3072, d = 768) and a LLaMA down_proj (k = 11008, d = 4096; M = 2048
tokens on a GPU, 512 on a CPU), r = 8; fp32 on a CPU, bf16 on a GPU.

Timing: the variants run in interleaved rounds (21 per shape, 15 for the model) and every ratio is the median of
the round-by-round ratios (``ratio_q1`` / ``ratio_q3``: their quartiles), which a drifting machine disturbs less
than a ratio of medians.

Model level: ViT-B/16 (transformers, 224^2) inference, frozen vs Adapter+ (post, r = 8; its adapter a separate
fused op after the block) vs Adapter+ after fuse_for_inference (the adapter inside fc2's kernel).
"""
from __future__ import annotations

import copy
import statistics
from typing import Callable, List

import torch
import torch.nn.functional as F

from .timing import interleaved_samples, paired_ratio

#: (name, M, k, d) per device type
OP_SHAPES = {"cuda": (("vit_b16_fc2", 64 * 197, 3072, 768), ("llama7b_down_proj", 2048, 11008, 4096)),
             "cpu": (("vit_b16_fc2", 64 * 197, 3072, 768), ("llama7b_down_proj", 512, 11008, 4096))}
QUICK_SHAPES = (("vit_b16_fc2_small", 256, 384, 96),)


def run_linear_op_benchmark(device: torch.device, *, quick: bool = False, r: int = 8, shapes=None,
                            log: Callable[[str], None] = print) -> List[dict]:
    """Rows {shape, M, k, d, r, dtype, variant, ms, ratio_vs_frozen}."""
    from ..functional import fused_adapter, fused_linear_adapter

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, m, k, d in shapes or (QUICK_SHAPES if quick else OP_SHAPES[device.type]):
        mk = lambda *s, std=1.0: (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype)  # noqa: E731
        inp, w, b, res = mk(m, k), mk(d, k, std=k ** -0.5), mk(d), mk(m, d)
        wd, bd, wu, bu = mk(r, d, std=d ** -0.5), mk(r), mk(d, r, std=0.02), mk(d)
        s = (torch.rand(d, generator=gen) + 0.5).to(device=device, dtype=dtype)
        w_merged = w + mk(d, r, std=0.02) @ mk(r, k, std=0.02)

        def then_adapter():
            t = F.linear(inp, w, b) + res
            return fused_adapter(t, wd, bd, wu, bu, scale=s, skip=t)

        fns = {"frozen": lambda: F.linear(inp, w, b) + res,
               "frozen_inplace": lambda: F.linear(inp, w, b).add_(res),
               "lora_merged": lambda: F.linear(inp, w_merged, b) + res,
               "linear_then_adapter": then_adapter,
               "fused_linear_adapter": lambda: fused_linear_adapter(inp, w, b, wd, bd, wu, bu, scale=s, residual=res,
                                                                    residual_position="before")}
        with torch.no_grad():
            times = interleaved_samples(fns, device, samples=5 if quick else 21, warm_calls=2)
        times["best_frozen"] = [min(a, b) for a, b in zip(times["frozen"], times["frozen_inplace"])]
        for variant, v in times.items():
            if variant == "best_frozen":
                continue
            ratio, q1, q3 = paired_ratio(times, variant, "frozen")
            rows.append(dict(shape=name, M=m, k=k, d=d, r=r, dtype=str(dtype).replace("torch.", ""), variant=variant,
                             ms=round(statistics.median(v) * 1e3, 3), ratio_vs_frozen=round(ratio, 4),
                             ratio_q1=round(q1, 4), ratio_q3=round(q3, 4),
                             ratio_vs_best_frozen=round(paired_ratio(times, variant, "best_frozen")[0], 4)))
        fused = paired_ratio(times, "fused_linear_adapter", "frozen")
        log(f"  {name:18s} " + "  ".join(f"{k_} {statistics.median(v) * 1e3:8.2f} ms" for k_, v in times.items()
                                         if k_ != "best_frozen") +
            f"   fused/frozen {fused[0]:.3f}x (quartiles {fused[1]:.3f}-{fused[2]:.3f}), /best frozen "
            f"{paired_ratio(times, 'fused_linear_adapter', 'best_frozen')[0]:.3f}x")
    return rows


def run_linear_model_benchmark(device: torch.device, *, quick: bool = False, r: int = 8, batch=None,
                               log: Callable[[str], None] = print) -> List[dict]:
    """Rows {model, batch, variant, ms, ratio_vs_frozen}: ViT-B/16 inference."""
    try:
        from transformers import ViTConfig, ViTModel
    except ImportError:
        log("  ViT-B/16 inference skipped: transformers is not installed")
        return []
    from ..inference import fuse_for_inference
    from ..integrations.hf import add_adapters
    from ..modules import AdapterConfig

    cfg = ViTConfig(num_hidden_layers=2, hidden_size=192, num_attention_heads=3, intermediate_size=768,
                    image_size=64) if quick else ViTConfig()
    b = batch or (2 if quick else (64 if device.type == "cuda" else 4))
    torch.manual_seed(0)
    frozen = ViTModel(cfg, add_pooling_layer=False).to(device).eval()
    adapted = copy.deepcopy(frozen)
    add_adapters(adapted, AdapterConfig.adapter_plus(bottleneck=r))
    with torch.no_grad():  # non-trivial adapters (Adapter+ starts with up = 0 under some inits)
        for n, p in adapted.named_parameters():
            if "adapterfuse" in n:
                p.normal_(std=0.02)
    adapted.eval()
    in_linear = copy.deepcopy(adapted)
    fuse_for_inference(in_linear)
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def call(model):
        def fn():
            with autocast:
                return model(pixel_values=x).last_hidden_state
        return fn

    fns = {"frozen": call(frozen), "adapter_plus": call(adapted), "adapter_plus_in_linear": call(in_linear)}
    with torch.no_grad():
        times = interleaved_samples(fns, device, samples=3 if quick else 15, warm_calls=2)
    name = "vit_b16" if cfg.hidden_size == 768 else f"vit_h{cfg.hidden_size}"
    rows = []
    for v, t in times.items():
        ratio, q1, q3 = paired_ratio(times, v, "frozen")
        rows.append(dict(model=name, batch=b, variant=v, ms=round(statistics.median(t) * 1e3, 3),
                         ratio_vs_frozen=round(ratio, 4), ratio_q1=round(q1, 4), ratio_q3=round(q3, 4)))
    fused = paired_ratio(times, "adapter_plus_in_linear", "frozen")
    log(f"  {name} batch {b}: " + "  ".join(f"{k} {statistics.median(v) * 1e3:8.1f} ms" for k, v in times.items()) +
        f"   in_linear/frozen {fused[0]:.3f}x (quartiles {fused[1]:.3f}-{fused[2]:.3f})")
    return rows


def linear_table(op_rows: List[dict], model_rows: List[dict]) -> str:
    from .report import text_table

    parts = []
    if op_rows:
        parts.append(text_table(op_rows, [("shape", "shape", "18s"), ("M", "M", "6d"), ("k", "k", "6d"),
                                          ("d", "d", "5d"), ("dtype", "dtype", "9s"), ("variant", "variant", "21s"),
                                          ("ms", "ms", "9.2f"), ("ratio_vs_frozen", "xfrozen", "8.3f"),
                                          ("ratio_vs_best_frozen", "xbest", "7.3f")]))
    if model_rows:
        parts.append(text_table(model_rows, [("model", "model", "9s"), ("batch", "batch", "5d"),
                                             ("variant", "variant", "23s"), ("ms", "ms", "9.1f"),
                                             ("ratio_vs_frozen", "xfrozen", "8.3f")]))
    return "\n\n".join(parts)
