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

import weakref

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import check_backend
from ..modules import Adapter, AdapterBank, AdapterConfig, make_adapter

__all__ = ["add_adapters", "remove_adapters", "ARCHITECTURES", "adapter_modules"]


@dataclass(frozen=True)
class Layout:
    """Where the sites are inside one transformer layer (paths relative to the layer)."""
    ffn_in: str              # submodule whose input is the FFN input z = LN(x')
    ffn_out: str             # the FFN's output projection (nn.Linear)
    attn_out: str            # the attention output projection (nn.Linear)


@dataclass(frozen=True)
class Arch:
    layers: Tuple[str, ...]       # class names of the transformer layers
    layouts: Tuple[Layout, ...]   # the module structures transformers releases give them, tried in order

    def layout(self, layer: nn.Module) -> Layout:
        """The first layout whose three submodules this layer has (transformers 5 restructured ViT / DeiT:
        ``mlp.fc1 / fc2`` and ``attention.o_proj`` instead of ``intermediate`` / ``output.dense`` /
        ``attention.output.dense``)."""
        for lay in self.layouts:
            if all(_has_submodule(layer, p) for p in (lay.ffn_in, lay.ffn_out, lay.attn_out)):
                return lay
        raise ValueError(f"add_adapters: {type(layer).__name__} has none of the module structures adapterfuse "
                         f"knows for it ({[(lay.ffn_in, lay.ffn_out, lay.attn_out) for lay in self.layouts]}); "
                         f"its children are {[n for n, _ in layer.named_children()]}")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


_BERT_LAYOUT = Layout("intermediate", "output.dense", "attention.output.dense")
ARCHITECTURES: Dict[str, Arch] = {
    "vit": Arch(("ViTLayer", "DeiTLayer"), (_BERT_LAYOUT, Layout("mlp", "mlp.fc2", "attention.o_proj"))),
    "bert": Arch(("BertLayer", "RobertaLayer"), (_BERT_LAYOUT,)),
    "llama": Arch(("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"),
                  (Layout("mlp", "mlp.down_proj", "self_attn.o_proj"),)),
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


# The hooks are instances of module-level classes holding their adapter, never closures: copy.deepcopy
# of the model then maps each hook's adapter to the copy's adapter (deepcopy's memo), and torch.save
# pickles them. remove_adapters finds them by class.


class _SequentialHook:
    """Forward hook: output -> output + s A(output) (first element when the module returns a tuple)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module, args, output):
        if isinstance(output, tuple):
            return (self.adapter(output[0], skip=output[0]),) + tuple(output[1:])
        return self.adapter(output, skip=output)


class _PreHook:
    """Forward pre-hook: input -> input + s A(input)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module, args):
        return (self.adapter(args[0], skip=args[0]),) + tuple(args[1:])


class _ParallelSite:
    """Captures the FFN input in a pre-hook, adds s A(input) to the FFN output in a forward hook."""

    def __init__(self, adapter: Adapter):
        self.adapter, self.z = adapter, None

    def __getstate__(self):  # a captured activation is never part of a copy or a checkpoint
        return {"adapter": self.adapter, "z": None}

    def capture(self, module, args):
        self.z = args[0]

    def add(self, module, args, output):
        z, self.z = self.z, None
        return self.adapter(z, skip=output)


class _Capture:
    def __init__(self, site: _ParallelSite):
        self.site = site

    def __call__(self, module, args):
        self.site.capture(module, args)


class _Add:
    def __init__(self, site: _ParallelSite):
        self.site = site

    def __call__(self, module, args, output):
        return self.site.add(module, args, output)


_HOOK_TYPES = (_SequentialHook, _PreHook, _Capture, _Add)


def _check_config(model, config) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_adapters: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"add_adapters: config must be an adapterfuse.AdapterConfig (e.g. "
                        f"AdapterConfig.adapter_plus(bottleneck=8)), got {type(config).__name__}")
    existing = [n for n, m in model.named_modules() if isinstance(m, (Adapter, AdapterBank))]
    if existing:
        raise ValueError(f"add_adapters: the model already has {len(existing)} adapterfuse adapters (e.g. "
                         f"{existing[0]!r}); call adapterfuse.remove_adapters(model) first to replace them")


def add_adapters(model: nn.Module, config: AdapterConfig, *, backend: str = "auto", freeze: bool = True,
                 trainable: Tuple[str, ...] = ("classifier", "head", "score", "lm_head_adapter"),
                 adapters: Optional[Sequence[str]] = None) -> List[str]:
    """Insert one adapter (two for houlsby) per transformer layer at ``config.position``.

    Args:
        model: a transformers ViT / BERT / RoBERTa / LLaMA / Mistral / Qwen2 model (any head), or a timm
            VisionTransformer.
        config: an AdapterConfig (e.g. ``AdapterConfig.adapter_plus(bottleneck=8)``).
        backend: passed to every Adapter.
        freeze: freeze every parameter except the adapters and the modules named in ``trainable``.
        adapters: names of several adapters per site: each site then holds an AdapterBank, and
            ``with adapterfuse.adapter_index(model, ids):`` says which adapter each sample uses.
    Returns:
        the qualified names of the adapters added.
    """
    from . import timm as _timm

    _check_config(model, config)
    check_backend(backend)
    if _timm.find_blocks(model):  # timm ViTs: block rewrite with the Adapter+ paper's exact positions
        return _timm.add_adapters(model, config, backend=backend, freeze=freeze, adapters=adapters)
    family, arch, layers = _find_layers(model)
    ref = next(model.parameters())
    added = []
    handles = _HANDLES.setdefault(model, [])
    layouts = [arch.layout(layer) for _, layer in layers]  # every layer checked before any is changed
    for (name, layer), lay in zip(layers, layouts):
        ffn_out = layer.get_submodule(lay.ffn_out)
        dim = _hidden_size(ffn_out)

        def make(site: str, after: Optional[str] = None) -> nn.Module:
            a = make_adapter(dim, config, adapters, backend=backend).to(device=ref.device, dtype=ref.dtype)
            a.train(model.training)  # an eval-mode model gets eval-mode adapters (no drop-path)
            if after is not None and isinstance(a, Adapter):  # the input is this Linear's output: mergeable
                a.attached_to = ("after", f"{name}.{after}" if name else after)
            layer.add_module(f"adapterfuse_{site}", a)
            added.append(f"{name}.adapterfuse_{site}")
            return a

        pos = config.position
        if pos == "post":
            handles.append(layer.register_forward_hook(_SequentialHook(make("post"))))
        elif pos == "pre":
            handles.append(layer.get_submodule(lay.ffn_in).register_forward_pre_hook(_PreHook(make("pre"))))
        elif pos in ("intermediate", "pfeiffer"):
            handles.append(ffn_out.register_forward_hook(_SequentialHook(make("ffn", lay.ffn_out))))
        elif pos == "houlsby":
            attn = layer.get_submodule(lay.attn_out)
            handles.append(attn.register_forward_hook(_SequentialHook(make("attn", lay.attn_out))))
            handles.append(ffn_out.register_forward_hook(_SequentialHook(make("ffn", lay.ffn_out))))
        elif pos == "parallel":
            site = _ParallelSite(make("parallel"))
            handles.append(layer.get_submodule(lay.ffn_in).register_forward_pre_hook(_Capture(site)))
            handles.append(ffn_out.register_forward_hook(_Add(site)))
        else:  # AdapterConfig validates positions; kept for subclasses
            raise ValueError(f"unknown position {pos!r}")
    if freeze:
        for pname, p in model.named_parameters():
            p.requires_grad_(".adapterfuse_" in pname or any(pname.startswith(t + ".") or f".{t}." in pname
                                                                for t in trainable))
    return added


# model -> the hook handles add_adapters registered on it (weak: they go with the model). Not an attribute of
# the model: a deep copy would copy handles that still point at the original's hook dictionaries.
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def adapter_hook_handles(model: nn.Module) -> list:
    """The torch.utils.hooks.RemovableHandle of every hook add_adapters registered on this model object."""
    return list(_HANDLES.get(model, []))


def adapter_modules(model: nn.Module) -> Dict[str, Adapter]:
    """The adapters that add_adapters put into a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (Adapter, AdapterBank)) and ".adapterfuse_" in f".{n}"}


def remove_adapters(model: nn.Module) -> List[str]:
    """Undo add_adapters: remove every adapter it added (transformers hooks or timm block forwards) and
    return their names. Parameters' requires_grad flags are left as they are."""
    from . import timm as _timm
    from ..inference import unfuse_for_inference

    unfuse_for_inference(model)  # fused sites hold the adapters in swapped forwards: the hooks come back first
    removed = _timm.remove_adapters(model)
    for handle in _HANDLES.pop(model, []):  # the handles add_adapters kept for this model object
        handle.remove()
    # a copy, an unpickled or a loaded model carries the hooks but not the handles: find them by type
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _HOOK_TYPES)]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(module, extra, {}).pop(key, None)
    for name, module in list(model.named_modules()):
        for child in [c for c, m in module.named_children()
                      if c.startswith("adapterfuse_") and isinstance(m, (Adapter, AdapterBank))]:
            delattr(module, child)
            removed.append(f"{name}.{child}" if name else child)
    return removed
