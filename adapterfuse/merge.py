"""Folding and merging adapters into weights for inference, exactly and reversibly.

* fold_scale(adapter): the scale (float, learned scalar or per channel) moves into ``up``
  (``W_up <- s W_up``, ``b_up <- s b_up``, scale <- 1). Valid in eval mode, where drop-path is off.
* merge_into_linear(adapter, linear, where): an adapter with ``activation="identity"`` is affine, so
    where="after"  (its input is the Linear's output, skip = that output; intermediate / houlsby /
                    pfeiffer positions):  W' = (I + S Wu Wd) W,  b' = (I + S Wu Wd) b + S (Wu bd + bu)
    where="beside" (it shares the Linear's input and adds to its output, a parallel adapter):
                    W' = W + S Wu Wd,  b' = b + S (Wu bd + bu)
  with S = diag(s). The adapter is then marked merged (its forward passes the skip through).
* LoRALinear.merge(): ``W + B A * alpha / r``.
* merge(model): every exact merge available, and a report of what was done and why not elsewhere.

Saving: state_dict() always holds the unmerged weights (the original Linear / up weights and the
adapter's scale) while anything is merged, so a checkpoint has one meaning and loads into a fresh model
with adapters; loading into a model while it is merged is refused (unmerge first).

Every merge computes the new weights in float64, refuses non-finite results before writing anything
(like PEFT's safe_merge) and keeps the original tensors, so unmerge()/unmerge_all() restore them bit
for bit.
"""
from __future__ import annotations

import sys
import types
from typing import Dict, Optional

import torch
from torch import nn

from .modules import Adapter, LoRALinear

__all__ = ["fold_scale", "unfold_scale", "merge_into_linear", "unmerge_from_linear", "merge", "unmerge"]


# ---- saving and loading merged models -----------------------------------------------------------
# The rule: state_dict() always holds the UNMERGED weights (the original Linear / up weights and the
# adapter's scale), whatever is merged at the time, so a checkpoint means one thing and loads into a
# fresh model with adapters (or into a model that is merged again afterwards). Loading a state dict into
# a model while it is merged is refused: call unmerge(model) first.


class _SaveOriginal:
    """State-dict hook of a module whose weights were changed by a merge: writes the originals back into
    the state dict under the module's prefix. ``originals`` maps a key suffix to its tensor."""

    def __init__(self, originals: Dict[str, torch.Tensor]):
        self.originals = originals

    def __call__(self, module, state_dict, prefix, local_metadata):
        for key, value in self.originals.items():
            if value is not None:
                state_dict[prefix + key] = value.detach().clone()


class _RefuseLoadWhileMerged:
    """Load-state-dict pre-hook: a merged module cannot take a checkpoint (it holds unmerged weights)."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if any(k.startswith(prefix) for k in state_dict):
            error_msgs.append(f"{prefix or 'the model'}: {self.what} is merged; state dicts hold unmerged weights, "
                              "so call adapterfuse.unmerge(model) before load_state_dict")


def _mark_merged(module: nn.Module, originals: Dict[str, Optional[torch.Tensor]], what: str) -> None:
    module._register_state_dict_hook(_SaveOriginal(originals))
    module._register_load_state_dict_pre_hook(_RefuseLoadWhileMerged(what))


def _unmark_merged(module: nn.Module) -> None:
    for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):
        for key in [k for k, h in hooks.items()
                    if isinstance(getattr(h, "hook", h), (_SaveOriginal, _RefuseLoadWhileMerged))]:
            del hooks[key]


def _scale_vector(adapter: Adapter) -> torch.Tensor:
    w = adapter.up.weight
    s = adapter.scale
    if isinstance(s, torch.Tensor):
        return s.detach().to(torch.float64).reshape(-1).expand(w.shape[0])
    return torch.full((w.shape[0],), float(s), dtype=torch.float64, device=w.device)


def _check_finite(what: str, *tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{what}: the merged weights have non-finite values; nothing was changed")


def _write(param: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def fold_scale(adapter: Adapter) -> None:
    """Move the adapter's scale into its up-projection (scale becomes the float 1.0)."""
    if getattr(adapter, "_folded", None) is not None:
        return
    s = _scale_vector(adapter)
    w = adapter.up.weight.detach().to(torch.float64) * s[:, None]
    b = None if adapter.up.bias is None else adapter.up.bias.detach().to(torch.float64) * s
    _check_finite("fold_scale", w, b)
    original = (adapter.up.weight.detach().clone(), None if b is None else adapter.up.bias.detach().clone(),
                adapter.scale)
    _write(adapter.up.weight, w)
    if b is not None:
        _write(adapter.up.bias, b)
    saved = {"up.weight": original[0], "up.bias": original[1]}
    if isinstance(adapter.scale, nn.Parameter):
        saved["scale"] = adapter.scale
        del adapter.scale
    adapter.scale = 1.0
    adapter._folded = original
    _mark_merged(adapter, saved, "its scale is folded into up")


def unfold_scale(adapter: Adapter) -> None:
    original = getattr(adapter, "_folded", None)
    if original is None:
        return
    w, b, scale = original
    _unmark_merged(adapter)
    _write(adapter.up.weight, w)
    if b is not None:
        _write(adapter.up.bias, b)
    if isinstance(scale, nn.Parameter):
        adapter.scale = scale  # re-registers the parameter
    else:
        adapter.scale = scale
    adapter._folded = None


def merge_into_linear(adapter: Adapter, linear: nn.Linear, where: str = "after") -> None:
    """Fold an identity-activation adapter into `linear` (see the module docstring for the maths)."""
    if adapter.activation != "identity":
        raise ValueError(f"only an adapter with activation='identity' is affine and can be merged; this one uses "
                         f"{adapter.activation!r} (fold_scale still applies)")
    if adapter.norm is not None:
        raise ValueError("an adapter with an input LayerNorm is not affine and cannot be merged (fold_scale still "
                         "applies)")
    if adapter.training and adapter.dropout > 0:
        raise ValueError("merge in eval mode: the adapter's dropout is active in training mode")
    if where not in ("after", "beside"):
        raise ValueError(f"where must be 'after' or 'beside', got {where!r}")
    if adapter.merged:
        return
    if adapter.training and adapter.drop_path > 0:
        raise ValueError("merge in eval mode: the adapter's drop-path is active in training mode")
    f64 = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    s = _scale_vector(adapter)
    wd, bd, wu, bu = f64(adapter.down.weight), f64(adapter.down.bias), f64(adapter.up.weight), f64(adapter.up.bias)
    delta = s[:, None] * (wu @ wd)                                  # S Wu Wd, [d, d]
    shift = s * ((wu @ bd if bd is not None else 0.0) + (bu if bu is not None else 0.0))
    w, b = f64(linear.weight), f64(linear.bias)
    if delta.shape[1] != (w.shape[0] if where == "after" else w.shape[1]):
        raise ValueError(f"adapter dim {delta.shape[0]} does not fit Linear {tuple(w.shape)} for where={where!r}")
    if where == "after":
        new_w = w + delta @ w
        new_b = (b + delta @ b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)) + shift
    else:
        new_w = w + delta
        new_b = (b if b is not None else 0.0) + shift
    if linear.bias is None and torch.count_nonzero(torch.as_tensor(new_b)) > 0:
        raise ValueError("the Linear has no bias but the merged adapter needs one (its biases are nonzero)")
    _check_finite("merge_into_linear", new_w, torch.as_tensor(new_b))
    adapter._merge_state = (linear, linear.weight.detach().clone(),
                            None if linear.bias is None else linear.bias.detach().clone())
    _write(linear.weight, new_w)
    if linear.bias is not None:
        _write(linear.bias, torch.as_tensor(new_b))
    _mark_merged(linear, {"weight": adapter._merge_state[1], "bias": adapter._merge_state[2]},
                 "an adapter merged into this Linear")
    adapter.merged = True


def unmerge_from_linear(adapter: Adapter) -> None:
    state = getattr(adapter, "_merge_state", None)
    if not adapter.merged or state is None:
        return
    linear, w, b = state
    _unmark_merged(linear)
    _write(linear.weight, w)
    if b is not None:
        _write(linear.bias, b)
    adapter.merged = False
    adapter._merge_state = None


def merge(model: nn.Module, *, fold: bool = True) -> Dict[str, str]:
    """Apply every exact merge available for inference; returns {module name: what was done / why not}.

    Put the model in eval mode first (drop-path must be off). Adapters that add_adapters placed after a
    Linear (intermediate, pfeiffer, houlsby) and use the identity activation are merged into it;
    LoRALinear layers are merged; every other adapter gets its scale folded into ``up`` (fold=True).
    """
    report = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.merge(safe=True)
            report[name] = "LoRA merged into its base Linear"
        elif isinstance(module, Adapter):
            if module.training and (module.drop_path > 0 or module.dropout > 0):
                report[name] = "skipped: in training mode with drop-path / dropout (call model.eval() first)"
                continue
            attached = module.attached_to
            if module.activation == "identity" and attached is not None:
                where, linear_name = attached
                try:
                    linear = model.get_submodule(linear_name)
                except AttributeError:
                    report[name] = f"skipped: its Linear {linear_name!r} is not under this model"
                    continue
                try:
                    merge_into_linear(module, linear, where)
                    report[name] = f"merged into {linear_name} ({where})"
                    continue
                except ValueError as e:  # e.g. a bias-free Linear under an adapter with biases
                    why = f"cannot merge into {linear_name}: {e}"
                if fold:
                    fold_scale(module)
                    report[name] = f"scale folded into up ({why})"
                else:
                    report[name] = f"skipped ({why})"
            elif fold:
                fold_scale(module)
                why = ("its activation is not the identity" if module.activation != "identity"
                       else "its input is not a Linear's output")
                report[name] = f"scale folded into up ({why}, so it cannot be merged away)"
    return report


def unmerge(model: nn.Module) -> None:
    """Undo merge(model): every merged adapter, folded scale and merged LoRA goes back bit for bit."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()
        elif isinstance(module, Adapter):
            unmerge_from_linear(module)
            unfold_scale(module)


class _CallableModule(types.ModuleType):
    """``adapterfuse.merge`` is this module and also callable as ``merge(model)``: ``af.merge(model)`` and
    ``adapterfuse.merge.fold_scale`` both work (a function bound to the package attribute would shadow the
    module after ``import adapterfuse.merge``)."""

    def __call__(self, model: nn.Module, *, fold: bool = True) -> Dict[str, str]:
        return merge(model, fold=fold)


sys.modules[__name__].__class__ = _CallableModule
