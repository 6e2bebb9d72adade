"""AdapterHub `adapters` (v1.3): make a model's bottleneck adapters compute through fused_adapter.

    import adapters
    adapters.init(model)
    model.add_adapter("task", config="seq_bn")       # SeqBn/Pfeiffer, DoubleSeqBn/Houlsby, ParBn, AdapterPlusConfig
    model.train_adapter("task")
    report = adapterfuse.integrations.adapters_hub.fuse(model)

fuse() swaps the forward of every fusable `adapters` bottleneck module (adapters.methods.modeling.Adapter
and ParallelAdapter) for one call of fused_adapter on the module's own parameters: nothing is copied,
so training the fused model trains the weights that `save_adapter` writes, and unfuse() restores the
original forwards. What `adapters` computes there (its Adapter.forward), in the cases fused:

    sequential:  out = residual + dropout(drop_path(up(act(down(x)))) * scaling)      (dropout p = 0)
    parallel:    out = up(act(down(x))) * scaling                                      (no residual)

with drop_path = torchvision's StochasticDepth(p, "row") in training: a per-sample 0 or 1/(1 - p),
which is fused_adapter's sample_scale. Not fused (left as they are, and named in the report with the
reason): PHM layers (Compacter), a LayerNorm inside the adapter (ln_before / ln_after), gating (UniPELT),
dropout > 0, activations the kernels do not have, adapters under an AdapterFusion layer (it needs the
bottleneck output `up`, which a fused adapter never materialises), and invertible adapters (not
bottleneck adapters). An AdapterFusion layer added after fuse() (the usual order) is honoured at run
time: the adapters of that layer then run their own unfused forward (with a warning), and so does any
adapter while gating scores are requested.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from .._checks import check_backend
from ..functional import fused_adapter

__all__ = ["fuse", "unfuse", "FuseReport"]

#: `adapters` non_linearity names (transformers' get_activation) -> fused activation
ACTIVATION_NAMES = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "swish": "silu", "silu": "silu", "linear": "identity"}


@dataclass
class FuseReport:
    fused: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # module name -> reason

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} bottleneck adapters"]
        lines += [f"  not fused: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _activation(module) -> str:
    f = module.non_linearity.f
    if isinstance(f, nn.Identity):
        return "identity"
    for cfg_name in ACTIVATION_NAMES:  # match by the class transformers' get_activation builds for the name
        try:
            from transformers.activations import get_activation

            if type(get_activation(cfg_name)) is type(f):
                return ACTIVATION_NAMES[cfg_name]
        except KeyError:
            continue
    return ""


def _down_linear(module):
    linears = [m for m in module.adapter_down if isinstance(m, nn.Linear)]
    return linears[0] if len(linears) == 1 else None


def _why_not(module, phm_cls) -> str:
    if any(isinstance(m, phm_cls) for m in module.modules()):
        return "PHM layers (Compacter): not a plain bottleneck"
    if module.add_layer_norm_before or module.add_layer_norm_after:
        return "a LayerNorm inside the adapter (ln_before / ln_after)"
    if module.use_gating:
        return "gating (use_gating=True)"
    if module.dropout.p > 0:
        return f"dropout p = {module.dropout.p} > 0"
    if _down_linear(module) is None or not isinstance(module.adapter_up, nn.Linear):
        return "the down/up projections are not single nn.Linear layers"
    if not _activation(module):
        return f"activation {type(module.non_linearity.f).__name__} has no fused kernel"
    drop = getattr(module, "DropPath", None)
    if drop is not None and getattr(drop, "mode", "row") != "row":
        return f"stochastic depth in mode {drop.mode!r} (only 'row', per sample, is fused)"
    return ""


class _FusedForward:
    """The fused forward of one `adapters` bottleneck module, set as the instance attribute
    ``module.forward``: an object of a module-level class (not a bound function), so the fused model
    deep-copies and pickles.

    It runs the module's own (unfused) forward where the fused op cannot give the caller what it needs:
    when the layer holding the adapter has an AdapterFusion layer (Fuse reads the bottleneck output `up`,
    which the fused op never materialises; this covers a fusion added after fuse()), and when gating
    scores are asked for (``output_adapter_gating_scores``, which reads the third output)."""

    def __init__(self, module: nn.Module, layer):
        self.module, self.layer = module, layer

    def __call__(self, x, residual_input, output_gating=False):
        module = self.module
        fusion = getattr(self.layer, "adapter_fusion_layer", None)
        if output_gating or (isinstance(fusion, nn.ModuleDict) and len(fusion) > 0):
            if not output_gating and not module._adapterfuse.get("warned"):
                module._adapterfuse["warned"] = True
                warnings.warn(f"adapterfuse: adapter {module.name!r} sits under an AdapterFusion layer, which needs "
                              "its bottleneck output; it runs unfused", RuntimeWarning, stacklevel=2)
            return type(module).forward(module, x, residual_input, output_gating)
        cfg = module._adapterfuse
        g = None
        drop = getattr(module, "DropPath", None)
        if not cfg["parallel"] and drop is not None and module.training and drop.p > 0:
            keep = 1.0 - drop.p
            g = x.new_empty(x.shape[0], dtype=torch.float32).bernoulli_(keep)
            if keep > 0:
                g.div_(keep)
        down, up = _down_linear(module), module.adapter_up
        out = fused_adapter(x, down.weight, down.bias, up.weight, up.bias, scale=module.scaling,
                            activation=cfg["activation"], skip=None if cfg["parallel"] else residual_input,
                            sample_scale=g, backend=cfg["backend"])
        # `down` and `up` are never materialised by the fused op; the callers that read them are routed to
        # the unfused forward above
        return out, None, None


def _owning_layers(model: nn.Module) -> Dict[int, nn.Module]:
    """id(adapter module) -> the `adapters` layer whose ``adapters`` dict holds it."""
    owners = {}
    for module in model.modules():
        held = getattr(module, "adapters", None)
        if isinstance(held, nn.ModuleDict):
            for child in held.values():
                owners[id(child)] = module
    return owners


def fuse(model: nn.Module, *, backend: str = "auto") -> FuseReport:
    """Route every fusable bottleneck adapter of an `adapters`-initialised model through fused_adapter."""
    try:
        from adapters.methods.modeling import Adapter as HubAdapter
        from adapters.methods.modeling import ParallelAdapter
        from adapters.methods.adapter_layer_base import ComposableAdapterLayerBase  # noqa: F401
    except ImportError as e:
        raise ImportError("adapterfuse.integrations.adapters_hub needs the `adapters` package (pip install "
                          f"adapters): {e}") from e
    try:
        from adapters.methods.modeling import PHMLayer  # re-exported there by adapters 1.x
    except ImportError:
        from adapters.methods.utils import PHMLayer  # type: ignore
    check_backend(backend)
    report = FuseReport()
    owners = _owning_layers(model)
    under_fusion = set()
    for name, module in model.named_modules():
        fusion = getattr(module, "adapter_fusion_layer", None)
        if isinstance(fusion, nn.ModuleDict) and len(fusion) > 0:
            under_fusion.update(f"{name}.adapters.{k}" if name else f"adapters.{k}" for k in module.adapters.keys())
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in ("NICECouplingBlock", "GLOWCouplingBlock"):
            report.skipped[name] = "invertible adapter: not a bottleneck adapter"
            continue
        if not isinstance(module, HubAdapter):
            continue
        why = _why_not(module, PHMLayer)
        if not why and name in under_fusion:
            why = "under an AdapterFusion layer, which needs the bottleneck output `up`"
        if why:
            report.skipped[name] = why
            continue
        module._adapterfuse = {"activation": _activation(module), "backend": backend,
                               "parallel": isinstance(module, ParallelAdapter)}
        module.forward = _FusedForward(module, owners.get(id(module)))
        report.fused.append(name)
    return report


def unfuse(model: nn.Module) -> int:
    """Restore the original forwards; returns how many adapters were unfused."""
    n = 0
    for module in model.modules():
        if hasattr(module, "_adapterfuse"):
            del module.forward  # the instance attribute; the class's forward shows again
            del module._adapterfuse
            n += 1
    return n
