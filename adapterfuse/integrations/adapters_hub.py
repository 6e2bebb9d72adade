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

    sequential:  out = residual + dropout(drop_path(up(act(down(x)))) * scaling)
    parallel:    out = up(act(down(x))) * scaling                                      (no residual)

with drop_path = torchvision's StochasticDepth(p, "row") in training: a per-sample 0 or 1/(1 - p),
which is fused_adapter's sample_scale. Also fused:

* gating (UniPELT's bottleneck adapter, ``use_gating=True``): `adapters` scales the adapter's output by one
  gate per sample, the token mean of sigmoid(gate(x)); that is the fused op's sample_scale (times the
  stochastic-depth factor), computed by torch from the module's own gate Linear, and returned as the
  gating score when ``output_adapter_gating_scores=True``;
* the adapter LayerNorms: ``ln_before`` inside the fused op (fused_adapter's layer_norm: the normalisation in
  the kernel's first pass over x, the LayerNorm's weight and bias folded into the down-projection);
  ``ln_after``: the fused op, then torch's LayerNorm, with the residual inside the fused op or added after the
  LayerNorm as ``adapter_residual_before_ln`` says (a LayerNorm of the output needs the whole row of y first);
* dropout inside the adapter, in training too: fused_adapter's dropout (a counter-based mask, regenerated in
  the backward). It draws its own mask, so a fused and an unfused run under one seed differ in which elements
  drop (same keep rate, same expectation); tests compare against the unfused module given the fused mask.

* adapters under an AdapterFusion layer, and non-gated adapters while gating scores are requested: the caller
  reads the bottleneck output ``up`` (Fuse attends over the ups of its adapters; `adapters` reports ``up`` as a
  non-gated adapter's score), so the fused op computes ``up`` (one fused call) and torch adds the module's tail
  (dropout, gate, residual, LayerNorm). This is decided per call, so a fusion layer added after fuse() (the usual
  order) is honoured.

Not fused (left as they are, and named in the report with the reason): PHM layers (Compacter), activations
the kernels do not have and invertible adapters (not bottleneck adapters). Adapters added or loaded after
fuse() are fused on their first forward (or named in a warning when they cannot be); fuse() may be called again.

Mixed batches: in every bottleneck layer with fused adapters, the `BatchSplit` and `Parallel` compositions
(each sample, or each repeated copy of the batch, through its own adapter: `adapters` loops over the
children, slicing the batch) run as one fused_adapter_bank call over the whole batch, when every child is a
fused adapter of that layer with the same shapes, activation and kind (sequential / parallel); anything else
(nested blocks, names without an adapter, an AdapterFusion layer, gating scores asked for) runs `adapters`'
own composition. The children's weights are stacked per call (the bank's gradients flow back to each
module's own parameters).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from .._checks import check_backend
from ..functional import fused_adapter, fused_adapter_bank, has_bank_kernels, has_ln_dropout_kernels

__all__ = ["fuse", "unfuse", "FuseReport"]

#: `adapters` non_linearity names (transformers' get_activation) -> fused activation
ACTIVATION_NAMES = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "swish": "silu", "silu": "silu", "linear": "identity"}


@dataclass
class FuseReport:
    fused: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # module name -> reason
    #: bottleneck layers whose BatchSplit / Parallel compositions run as one adapter-bank call
    banked_layers: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} bottleneck adapters"
                 + (f"; BatchSplit / Parallel as one bank call in {len(self.banked_layers)} layers"
                    if self.banked_layers else "")]
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
    if _down_linear(module) is None or not isinstance(module.adapter_up, nn.Linear):
        return "the down/up projections are not single nn.Linear layers"
    if not _activation(module):
        return f"activation {type(module.non_linearity.f).__name__} has no fused kernel"
    drop = getattr(module, "DropPath", None)
    if drop is not None and getattr(drop, "mode", "row") != "row":
        return f"stochastic depth in mode {drop.mode!r} (only 'row', per sample, is fused)"
    return ""


def _drop_p(module, parallel: bool) -> float:
    """The stochastic-depth probability the module applies now (0 in eval, for parallel adapters, or without)."""
    drop = getattr(module, "DropPath", None)
    if parallel or drop is None or not module.training:
        return 0.0
    return float(drop.p)


def _row_keep(x, n: int, p: float) -> torch.Tensor:
    """torchvision's StochasticDepth(p, "row") as a per-sample factor for n samples: 0 or 1 / (1 - p), drawn
    exactly as it draws them (so the fused and unfused models agree under the same seed)."""
    if p <= 0:
        return torch.ones(n, dtype=torch.float32, device=x.device)
    keep = 1.0 - p
    g = x.new_empty(n, dtype=torch.float32).bernoulli_(keep)
    return g.div_(keep) if keep > 0 else g


def _unfused_now(module, x, output_gating: bool) -> bool:
    """Whether the module must run its own forward for this call: dropout active inside the adapter on a backend
    without dropout kernels (backend='cuda'), or a gate over a non-[B, T, d] input."""
    if module.training and module.dropout.p > 0 and not has_ln_dropout_kernels(module._adapterfuse["backend"]):
        return True
    return module.use_gating and x.dim() != 3


class _FusedForward:
    """The fused forward of one `adapters` bottleneck module, set as the instance attribute
    ``module.forward``: an object of a module-level class (not a bound function), so the fused model
    deep-copies and pickles.

    Where the caller reads the bottleneck output ``up`` (= drop_path(up_proj(act(down_proj(x)))) * scaling) — an
    AdapterFusion layer holds the adapter (Fuse attends over the ups of its adapters; this covers a fusion added
    after fuse()), or gating scores are asked of a non-gated adapter (`adapters` reports ``up`` as its score) — the
    fused op computes ``up`` itself (no skip, no gate, no dropout: one fused call writing [M, d]) and torch finishes
    the module's tail (dropout, gate, residual, LayerNorm) exactly as `adapters` does (Adapter.forward, or
    ParallelAdapter.forward without the residual). Otherwise the whole adapter, residual included, is one fused
    call."""

    def __init__(self, module: nn.Module, layer):
        self.module, self.layer = module, layer

    def __call__(self, x, residual_input, output_gating=False):
        module = self.module
        cfg = module._adapterfuse
        parallel = cfg["parallel"]
        fusion = getattr(self.layer, "adapter_fusion_layer", None)
        needs_up = (isinstance(fusion, nn.ModuleDict) and len(fusion) > 0) or (output_gating and not module.use_gating)
        if _unfused_now(module, x, output_gating):
            return type(module).forward(module, x, residual_input, output_gating)
        p = _drop_p(module, parallel)
        g = _row_keep(x, x.shape[0], p) if p > 0 else None
        gate = None
        if module.use_gating:  # `adapters`' gate: one per sample, the token mean of sigmoid(gate(x)), [B, 1, 1]
            gate = torch.mean(torch.sigmoid(module.gate(x)), dim=1).unsqueeze(-1)
        layer_norm = None
        x_in = x
        if module.add_layer_norm_before:  # the adapter's input LayerNorm, inside the fused op where it can be
            ln = module.adapter_norm_before
            if has_ln_dropout_kernels(cfg["backend"]):
                layer_norm = (ln.weight, ln.bias, ln.eps)
            else:  # (backend='cuda': torch's LayerNorm, then the fused op)
                x_in = ln(x)
        down, up_proj = _down_linear(module), module.adapter_up
        ln_after = module.adapter_norm_after if module.add_layer_norm_after else None
        if needs_up:  # up from the fused op, then `adapters`' own tail (Adapter.forward after `up * scaling`)
            up = fused_adapter(x_in, down.weight, down.bias, up_proj.weight, up_proj.bias, scale=module.scaling,
                               activation=cfg["activation"], sample_scale=g, layer_norm=layer_norm,
                               backend=cfg["backend"])
            out = module.dropout(up)
            if gate is not None:
                out = out * gate
            if module.adapter_residual_before_ln and not parallel:  # (a parallel adapter adds no residual)
                out = out + residual_input
            if ln_after is not None:
                out = ln_after(out)
            if not module.adapter_residual_before_ln and not parallel:
                out = out + residual_input
            return (out, None, up, gate) if output_gating and gate is not None else (out, None, up)
        if gate is not None:
            g = gate.reshape(-1) if g is None else g * gate.reshape(-1)
        dropout = float(module.dropout.p) if module.training else 0.0
        # the residual goes inside the fused op unless a LayerNorm comes between them
        inside = not parallel and (ln_after is None or module.adapter_residual_before_ln)
        out = fused_adapter(x_in, down.weight, down.bias, up_proj.weight, up_proj.bias, scale=module.scaling,
                            activation=cfg["activation"], skip=residual_input if inside else None,
                            sample_scale=g, layer_norm=layer_norm, dropout=dropout, backend=cfg["backend"])
        if ln_after is not None:
            out = ln_after(out)
            if not parallel and not module.adapter_residual_before_ln:
                out = out + residual_input
        # `down` is never materialised (no caller in `adapters` 1.3 reads it); `up` only where a caller reads it
        if output_gating and gate is not None:
            return out, None, None, gate
        return out, None, None


def _routed_unfused(module, layer) -> bool:
    """Whether _FusedForward would run the module's own forward now (a fusion layer, gating scores asked for)."""
    from adapters.context import ForwardContext

    fusion = getattr(layer, "adapter_fusion_layer", None)
    context = ForwardContext.get_context()
    gating = context.output_adapter_gating_scores if context is not None else False
    return bool(gating) or (isinstance(fusion, nn.ModuleDict) and len(fusion) > 0)


def _bank_members(layer, children) -> list:
    """The adapter modules of `children` (names) when one bank call can run them all, else []."""
    mods = []
    for child in children:
        module = layer.adapters[child] if isinstance(child, str) and child in layer.adapters else None
        if module is None or not isinstance(getattr(module, "forward", None), _FusedForward):
            return []
        mods.append(module)
    if any(m.use_gating or m.add_layer_norm_before or m.add_layer_norm_after or (m.training and m.dropout.p > 0)
           for m in mods):
        return []  # (gates, adapter LayerNorms, active dropout: each child fused on its own)
    first = mods[0]
    shape = lambda m: (_down_linear(m).weight.shape, _down_linear(m).bias is None, m.adapter_up.bias is None,  # noqa
                       m._adapterfuse["activation"], m._adapterfuse["parallel"], m._adapterfuse["backend"])
    if any(shape(m) != shape(first) for m in mods) or _routed_unfused(first, layer):
        return []
    return mods


def _bank_scale(mods, d: int):
    """The bank's scale from the modules' `scaling` (float, learned [1] or channel [d]): a float when all are
    the same float, else [A] or [A, d] (stacked, so gradients reach every learned scaling)."""
    scales = [m.scaling for m in mods]
    if all(not isinstance(v, torch.Tensor) for v in scales) and len(set(scales)) == 1:
        return float(scales[0])
    like = next((v for v in scales if isinstance(v, torch.Tensor)), None)
    dev = like.device if like is not None else _down_linear(mods[0]).weight.device
    as_t = [v if isinstance(v, torch.Tensor) else torch.tensor([float(v)], device=dev) for v in scales]
    if any(v.numel() != 1 for v in as_t):
        return torch.stack([v.reshape(-1).expand(d) for v in as_t])
    return torch.cat([v.reshape(1) for v in as_t])


class _BankComposition:
    """A bottleneck layer's `compose_batch_split` / `compose_parallel`, set as instance attributes (the layer's
    composition map looks them up by name): one fused_adapter_bank call for all children, each sample (or each
    repeated copy of the batch) with its child's id, where _bank_members allows; else `adapters`' own loop."""

    def __init__(self, layer, kind: str):
        self.layer, self.kind = layer, kind

    def __call__(self, adapter_setup, state, lvl: int = 0):
        layer = self.layer
        own = getattr(type(layer), f"compose_{self.kind}")
        mods = _bank_members(layer, list(adapter_setup))
        if not mods:
            return own(layer, adapter_setup, state, lvl)
        if self.kind == "batch_split":
            sizes = list(adapter_setup.batch_sizes)
            if sum(sizes) != layer._bsz(state):
                raise IndexError(f"The given batch has a size of {layer._bsz(state)} which is not equal to the sum "
                                 f"of batch_sizes {sizes}")
        else:
            state, per_copy = _parallel_copies(layer, adapter_setup, state)
            sizes = [per_copy] * len(mods)
        state = layer.pre_block(adapter_setup, state)
        x = state.hidden_states
        # (built on the host: a device repeat_interleave would sync to size its output)
        ids = torch.repeat_interleave(torch.arange(len(mods)), torch.tensor(sizes)).to(x.device, non_blocking=True)
        parallel = mods[0]._adapterfuse["parallel"]
        g = None
        drops = [_drop_p(m, parallel) for m in mods]
        if any(p > 0 for p in drops):  # each sample's stochastic depth with its own adapter's p, drawn child by
            # child in the order `adapters`' loop draws them (the same masks as unfused under the same seed)
            g = torch.cat([_row_keep(x, n, p) for n, p in zip(sizes, drops)])
        downs = [_down_linear(m) for m in mods]
        ups = [m.adapter_up for m in mods]
        stack = lambda ts: None if ts[0] is None else torch.stack(ts)  # noqa: E731
        y = fused_adapter_bank(x, torch.stack([m.weight for m in downs]), stack([m.bias for m in downs]),
                               # w_up up-major, as AdapterBank keeps it (the CPU kernels read it as it is)
                               torch.stack([m.weight.t() for m in ups]).transpose(1, 2), stack([m.bias for m in ups]),
                               ids,
                               scale=_bank_scale(mods, x.shape[-1]), activation=mods[0]._adapterfuse["activation"],
                               skip=None if parallel else state.adapter_residual, sample_scale=g,
                               backend=mods[0]._adapterfuse["backend"])
        return state._replace(hidden_states=y, bottleneck_up=None, last=list(adapter_setup)[-1])


def _parallel_copies(layer, adapter_setup, state):
    """`adapters`' Parallel bookkeeping (the batch repeated once per child unless the model already did):
    (state, rows per copy)."""
    from adapters.context import ForwardContext

    n = adapter_setup.parallel_channels
    context = ForwardContext.get_context()
    bsz = layer._bsz(state)
    if not context.adapters_parallelized:
        state = layer.repeat(state, n)
        context.adapters_parallelized = True
        context.original_batch_size = bsz
        return state, bsz
    if layer.allow_multi_parallelize and bsz == getattr(context, "original_batch_size", -1):
        return layer.repeat(state, n), bsz
    if bsz % n != 0:
        raise ValueError("The total input batch size in a Parallel adapter block must be divisible by the number of"
                         " parallel channels.")
    return state, bsz // n


def _owning_layers(model: nn.Module) -> Dict[int, nn.Module]:
    """id(adapter module) -> the `adapters` layer whose ``adapters`` dict holds it."""
    owners = {}
    for module in model.modules():
        held = getattr(module, "adapters", None)
        if isinstance(held, nn.ModuleDict):
            for child in held.values():
                owners[id(child)] = module
    return owners


def _hub_classes():
    try:
        from adapters.methods.bottleneck import BottleneckLayer
        from adapters.methods.modeling import Adapter as HubAdapter
        from adapters.methods.modeling import ParallelAdapter
    except ImportError as e:
        raise ImportError("adapterfuse.integrations.adapters_hub needs the `adapters` package (pip install "
                          f"adapters): {e}") from e
    try:
        from adapters.methods.modeling import PHMLayer  # re-exported there by adapters 1.x
    except ImportError:
        from adapters.methods.utils import PHMLayer  # type: ignore
    return HubAdapter, ParallelAdapter, PHMLayer, BottleneckLayer


def _fuse_module(module, layer, backend: str, parallel_cls) -> None:
    module._adapterfuse = {"activation": _activation(module), "backend": backend,
                           "parallel": isinstance(module, parallel_cls)}
    module.forward = _FusedForward(module, layer)


class _FuseOnUse:
    """A bottleneck layer's ``compose_single``, set by fuse(): an adapter added or loaded after fuse() is fused
    on its first forward (or, when it cannot be, named in a warning once), then `adapters`' own
    compose_single runs."""

    def __init__(self, layer, backend: str):
        self.layer, self.backend = layer, backend

    def __call__(self, adapter_setup, state, lvl: int = 0):
        layer = self.layer
        module = layer.adapters[adapter_setup] if adapter_setup in layer.adapters else None
        if module is not None and not isinstance(module.__dict__.get("forward"), _FusedForward) \
                and not module.__dict__.get("_adapterfuse_checked"):
            module._adapterfuse_checked = True
            _, parallel_cls, phm_cls, _ = _hub_classes()
            why = _why_not(module, phm_cls)
            if why:
                warnings.warn(f"adapterfuse: adapter {adapter_setup!r}, added after fuse(), runs unfused: {why}",
                              RuntimeWarning, stacklevel=2)
            else:
                _fuse_module(module, layer, self.backend, parallel_cls)
        return type(layer).compose_single(layer, adapter_setup, state, lvl)


def fuse(model: nn.Module, *, backend: str = "auto") -> FuseReport:
    """Route every fusable bottleneck adapter of an `adapters`-initialised model through fused_adapter, and
    every bottleneck layer's BatchSplit / Parallel over fused adapters through one fused_adapter_bank call.
    Adapters added or loaded later are fused on their first forward (or named in a warning); calling fuse()
    again is safe (it re-fuses with the backend given)."""
    HubAdapter, ParallelAdapter, PHMLayer, BottleneckLayer = _hub_classes()
    check_backend(backend)
    report = FuseReport()
    owners = _owning_layers(model)
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in ("NICECouplingBlock", "GLOWCouplingBlock"):
            report.skipped[name] = "invertible adapter: not a bottleneck adapter"
            continue
        if not isinstance(module, HubAdapter):
            continue
        why = _why_not(module, PHMLayer)
        if why:
            report.skipped[name] = why
            module._adapterfuse_checked = True  # (reported here: not retried, nor warned about, on first use)
            continue
        _fuse_module(module, owners.get(id(module)), backend, ParallelAdapter)
        report.fused.append(name)
    bank = has_bank_kernels(backend)  # (the CUDA backend has none: each child of a mix runs its own fused call)
    for name, module in model.named_modules():
        if not isinstance(module, BottleneckLayer):
            continue
        module.compose_single = _FuseOnUse(module, backend)
        if bank:
            module.compose_batch_split = _BankComposition(module, "batch_split")
            module.compose_parallel = _BankComposition(module, "parallel")
            if any(isinstance(m.__dict__.get("forward"), _FusedForward) for m in module.adapters.values()):
                report.banked_layers.append(name)
        else:
            for attr in ("compose_batch_split", "compose_parallel"):
                module.__dict__.pop(attr, None)
        module._adapterfuse_compose = True
    return report


def unfuse(model: nn.Module) -> int:
    """Restore the original forwards; returns how many adapters were unfused."""
    n = 0
    for module in model.modules():
        if "_adapterfuse_compose" in vars(module):
            for attr in ("compose_single", "compose_batch_split", "compose_parallel", "_adapterfuse_compose"):
                module.__dict__.pop(attr, None)
        module.__dict__.pop("_adapterfuse_checked", None)
        if hasattr(module, "_adapterfuse"):
            del module.forward  # the instance attribute; the class's forward shows again
            del module._adapterfuse
            n += 1
    return n
