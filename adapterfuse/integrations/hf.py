"""Add fused adapters to Hugging Face transformers models (ViT, BERT/RoBERTa, LLaMA-family) in one call,
without the `adapters` library (timm VisionTransformers are handed to adapterfuse.integrations.timm). The rewrite works through forward hooks on the model's own modules,
so the model class, its weights and its state-dict keys are untouched; the adapters become submodules
of the transformer layers (``<layer>.adapterfuse_<site>``) and train, save and load with the model.

Positions (the Adapter+ paper's names), for one transformer layer with FFN input z = LN(x'):
    post          after the FFN block and its residual:  y -> y + s A(y)          (Adapter+)
    pre           before the FFN, on its input:           z -> z + s A(z)
    intermediate  on the FFN output, before the residual: f -> f + s A(f)
    pfeiffer      as intermediate (one adapter after the FFN, Pfeiffer et al. 2020)
    houlsby       intermediate after attention and after the FFN (Houlsby et al. 2019)
    parallel      beside the FFN:                         f -> f + s A(z)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..modules import Adapter, AdapterConfig

__all__ = ["add_adapters", "ARCHITECTURES", "adapter_modules"]


@dataclass(frozen=True)
class Arch:
    layers: Tuple[str, ...]  # class names of the transformer layers
    ffn_in: str              # submodule (relative to the layer) whose input is the FFN input
    ffn_out: str             # the FFN's output projection (nn.Linear)
    attn_out: str            # the attention output projection (nn.Linear)


ARCHITECTURES: Dict[str, Arch] = {
    "vit": Arch(("ViTLayer", "DeiTLayer"), "intermediate", "output.dense", "attention.output.dense"),
    "bert": Arch(("BertLayer", "RobertaLayer"), "intermediate", "output.dense", "attention.output.dense"),
    "llama": Arch(("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"), "mlp", "mlp.down_proj",
                  "self_attn.o_proj"),
}


def _find_layers(model: nn.Module):
    for family, arch in ARCHITECTURES.items():
        layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in arch.layers]
        if layers:
            return family, arch, layers
    names = sorted({type(m).__name__ for m in model.modules()})[:20]
    raise ValueError(f"add_adapters: no supported transformer layer found (supported: "
                     f"{ {k: v.layers for k, v in ARCHITECTURES.items()} }); the model has {names}...")


def _hidden_size(linear: nn.Module) -> int:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    return linear.out_features


def _sequential_hook(adapter: Adapter):
    """Forward hook: output -> output + s A(output) (first element when the module returns a tuple)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0], skip=output[0]),) + tuple(output[1:])
        return adapter(output, skip=output)

    return hook


def _pre_hook(adapter: Adapter):
    def hook(module, args):
        return (adapter(args[0], skip=args[0]),) + tuple(args[1:])

    return hook


class _ParallelSite:
    """Captures the FFN input in a pre-hook, adds s A(input) to the FFN output in a forward hook."""

    def __init__(self, adapter: Adapter):
        self.adapter, self.z = adapter, None

    def capture(self, module, args):
        self.z = args[0]

    def add(self, module, args, output):
        z, self.z = self.z, None
        return self.adapter(z, skip=output)


def add_adapters(model: nn.Module, config: AdapterConfig, *, backend: str = "auto", freeze: bool = True,
                 trainable: Tuple[str, ...] = ("classifier", "head", "score", "lm_head_adapter")) -> List[str]:
    """Insert one adapter (two for houlsby) per transformer layer at ``config.position``.

    Args:
        model: a transformers ViT / BERT / RoBERTa / LLaMA / Mistral / Qwen2 model (any head), or a timm
            VisionTransformer.
        config: an AdapterConfig (e.g. ``AdapterConfig.adapter_plus(bottleneck=8)``).
        backend: passed to every Adapter.
        freeze: freeze every parameter except the adapters and the modules named in ``trainable``.
    Returns:
        the qualified names of the adapters added.
    """
    from . import timm as _timm

    if _timm.find_blocks(model):  # timm ViTs: block rewrite with the Adapter+ paper's exact positions
        return _timm.add_adapters(model, config, backend=backend, freeze=freeze)
    family, arch, layers = _find_layers(model)
    ref = next(model.parameters())
    added = []
    for name, layer in layers:
        ffn_out = layer.get_submodule(arch.ffn_out)
        dim = _hidden_size(ffn_out)

        def make(site: str, after: Optional[str] = None) -> Adapter:
            a = Adapter.from_config(dim, config, backend=backend).to(device=ref.device, dtype=ref.dtype)
            a.train(model.training)  # an eval-mode model gets eval-mode adapters (no drop-path)
            if after is not None:  # the adapter's input is this Linear's output: mergeable when linear
                a.attached_to = ("after", f"{name}.{after}" if name else after)
            layer.add_module(f"adapterfuse_{site}", a)
            added.append(f"{name}.adapterfuse_{site}")
            return a

        pos = config.position
        if pos == "post":
            layer.register_forward_hook(_sequential_hook(make("post")))
        elif pos == "pre":
            layer.get_submodule(arch.ffn_in).register_forward_pre_hook(_pre_hook(make("pre")))
        elif pos in ("intermediate", "pfeiffer"):
            ffn_out.register_forward_hook(_sequential_hook(make("ffn", arch.ffn_out)))
        elif pos == "houlsby":
            attn = layer.get_submodule(arch.attn_out)
            attn.register_forward_hook(_sequential_hook(make("attn", arch.attn_out)))
            ffn_out.register_forward_hook(_sequential_hook(make("ffn", arch.ffn_out)))
        elif pos == "parallel":
            site = _ParallelSite(make("parallel"))
            layer.get_submodule(arch.ffn_in).register_forward_pre_hook(site.capture)
            ffn_out.register_forward_hook(site.add)
        else:  # AdapterConfig validates positions; kept for subclasses
            raise ValueError(f"unknown position {pos!r}")
    if freeze:
        for pname, p in model.named_parameters():
            p.requires_grad_(".adapterfuse_" in pname or any(pname.startswith(t + ".") or f".{t}." in pname
                                                                for t in trainable))
    return added


def adapter_modules(model: nn.Module) -> Dict[str, Adapter]:
    """The adapters that add_adapters put into a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter) and ".adapterfuse_" in f".{n}"}
