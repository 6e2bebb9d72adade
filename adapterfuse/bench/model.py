"""Model-level benchmark: one training step and one inference pass of a ViT-B/16 (transformers, and timm
where it imports) and of a LLaMA-style decoder stack, built locally from configs (no download), in four
variants:

    frozen         the model alone, only a linear head trains (linear probing)
    adapter_eager  Adapter+ (post position, r = 8 by default) through the pure-torch reference
    adapter_fused  the same adapters through the fused kernels (backend "auto")
    lora           PEFT LoRA on the attention query/value projections, rank chosen so that its trainable
                   parameter count matches the adapters' (inference also timed with LoRA merged)

A training step is forward + loss + backward (no optimiser step: it is the same for every variant).
On CUDA the model runs under bf16 autocast; on CPU in fp32 with small configurations.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional

import torch
from torch import nn

import adapterfuse

from .timing import median_ms, peak_memory_mb


def _configs(device: torch.device, quick: bool):
    from transformers import LlamaConfig, ViTConfig

    if device.type == "cuda" and not quick:
        vit = (ViTConfig(), 64)  # ViT-B/16 at 224^2, batch 64
        llama = (LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                             num_key_value_heads=32, num_hidden_layers=4, vocab_size=32000), 4, 2048)
    elif device.type == "cuda":
        vit = (ViTConfig(), 16)
        llama = (LlamaConfig(hidden_size=2048, intermediate_size=5504, num_attention_heads=16,
                             num_key_value_heads=16, num_hidden_layers=2, vocab_size=32000), 2, 1024)
    else:  # CPU: the same architectures, scaled down so a run takes seconds
        vit = (ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                         image_size=112), 8 if quick else 16)
        llama = (LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                             num_hidden_layers=2, vocab_size=1000), 2, 128 if quick else 256)
    return vit, llama


class _Probe(nn.Module):
    """Backbone + trainable linear head on the first token (CLS for ViT, BOS for the decoder)."""

    def __init__(self, backbone: nn.Module, hidden: int, kind: str):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.head = nn.Linear(hidden, 100)

    def forward(self, inputs):
        if self.kind == "timm":
            h = self.backbone.forward_features(inputs)
        elif self.kind == "vit":
            h = self.backbone(pixel_values=inputs).last_hidden_state
        else:
            h = self.backbone(input_ids=inputs).last_hidden_state
        return self.head(h[:, 0].float())


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _lora(model: _Probe, candidates, budget: int):
    """PEFT LoRA on the first of the `candidates` (tuples of Linear names: one per transformers release's module
    names) that the backbone has, with the rank whose parameter count is closest to `budget`."""
    from peft import LoraConfig, get_peft_model

    for targets in candidates:
        per_rank = sum(m.in_features + m.out_features for n, m in model.backbone.named_modules()
                       if isinstance(m, nn.Linear) and n.split(".")[-1] in targets)
        if per_rank:
            break
    else:
        raise ValueError(f"LoRA baseline: the backbone has none of the Linears {candidates}")
    rank = max(1, round(budget / max(per_rank, 1)))
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), modules_to_save=None)
    model.backbone = get_peft_model(model.backbone, cfg)
    model.head.requires_grad_(True)
    return rank


def run_model_benchmark(device: torch.device, *, quick: bool = False, bottleneck: int = 8,
                        log: Callable[[str], None] = print, deadline=None,
                        on_rows: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    try:
        from transformers import LlamaModel, ViTModel
    except ImportError as e:
        log(f"  model benchmark skipped: transformers is not installed ({e})")
        return []
    (vit_cfg, vit_batch), (llama_cfg, llama_batch, seq) = _configs(device, quick)
    rows = []
    gen = torch.Generator().manual_seed(0)
    specs = [
        ("vit_b16" if vit_cfg.hidden_size == 768 else f"vit_h{vit_cfg.hidden_size}", "vit",
         lambda: ViTModel(vit_cfg, add_pooling_layer=False), vit_cfg.hidden_size,
         (("query", "value"), ("q_proj", "v_proj")),  # transformers 4 / 5 names
         torch.randn(vit_batch, 3, vit_cfg.image_size, vit_cfg.image_size, generator=gen)),
        (f"llama_h{llama_cfg.hidden_size}_l{llama_cfg.num_hidden_layers}", "llama", lambda: LlamaModel(llama_cfg),
         llama_cfg.hidden_size, (("q_proj", "v_proj"),),
         torch.randint(0, llama_cfg.vocab_size, (llama_batch, seq), generator=gen)),
    ]
    try:  # timm (the Adapter+ home) where it imports: its ViT-B/16, same batch as the HF one
        import timm

        if vit_cfg.hidden_size == 768:
            specs.insert(1, ("timm_vit_b16", "timm",
                             lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0),
                             768, (("qkv",),), torch.randn(vit_batch, 3, 224, 224, generator=gen)))
    except Exception as e:  # noqa: BLE001  (timm's import fails in many ways without a matching torchvision)
        log(f"  timm model skipped: timm does not import here ({type(e).__name__})")
    autocast = device.type == "cuda"
    for name, kind, build, hidden, lora_targets, inputs in specs:
        if deadline is not None and deadline.skip(f"model {name}"):
            continue
        first = len(rows)
        torch.manual_seed(0)
        backbone = build().to(device).eval()
        inputs = inputs.to(device)
        base = _Probe(backbone, hidden, kind).to(device)
        variants = {}
        frozen = base
        frozen.backbone.requires_grad_(False)
        variants["frozen"] = frozen
        cfg = adapterfuse.AdapterConfig.adapter_plus(bottleneck=bottleneck)
        for vname, backend in (("adapter_eager", "torch"), ("adapter_fused", "auto")):
            m = copy.deepcopy(base)
            adapterfuse.add_adapters(m.backbone, cfg, backend=backend, freeze=True)
            m.head.requires_grad_(True)
            variants[vname] = m
        budget = _trainable(variants["adapter_fused"]) - _trainable(frozen)
        lora_rank = None
        try:
            m = copy.deepcopy(base)
            lora_rank = _lora(m, lora_targets, budget)
            variants["lora"] = m
        except ImportError:
            log("  lora skipped: peft is not installed")
        for vname, model in variants.items():
            for mode in ("train", "infer"):
                fn = _step(model, inputs, mode, autocast)
                model.train(mode == "train")
                ms = median_ms(fn, device, quick=quick)
                rows.append(dict(model=name, batch=int(inputs.shape[0]), mode=mode, variant=vname, ms=ms,
                                 trainable_params=_trainable(model) - _trainable(frozen) if vname != "frozen" else 0,
                                 lora_rank=lora_rank if vname == "lora" else None,
                                 peak_mem_mb=peak_memory_mb(fn, device)))
                log(f"  {name:18s} {mode:5s} {vname:14s} {ms:9.2f} ms")
            if vname == "lora" and hasattr(model.backbone, "merge_adapter"):
                model.backbone.merge_adapter()
                model.eval()
                fn = _step(model, inputs, "infer", autocast)
                ms = median_ms(fn, device, quick=quick)
                rows.append(dict(model=name, batch=int(inputs.shape[0]), mode="infer", variant="lora_merged", ms=ms,
                                 trainable_params=0, lora_rank=lora_rank, peak_mem_mb=peak_memory_mb(fn, device)))
                log(f"  {name:18s} infer lora_merged    {ms:9.2f} ms")
        del variants, base, backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(rows[first:])
    return rows


def _step(model: nn.Module, inputs: torch.Tensor, mode: str, autocast: bool):
    device_type = inputs.device.type

    def run():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            if mode == "infer":
                with torch.no_grad():
                    return model(inputs)
            loss = model(inputs).float().square().mean()
        for p in model.parameters():
            p.grad = None
        loss.backward()

    return run
