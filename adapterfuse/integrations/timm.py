"""Fused adapters in timm VisionTransformers (the Adapter+ home), at the positions the Adapter+ paper
studies, with the block semantics of its reference code, and loading of checkpoints trained with the
`adapter-plus` package.

The rewrite never imports timm: it recognises timm's ``Block`` by structure (norm1, attn, ls1,
drop_path1, norm2, mlp, ls2, drop_path2) and rebinds its ``forward``. Per block, with
A(.) = drop_path(up(act(down(.)))) * s (the adapter branch) and the block's own
y = x + attention branch, f = MLP branch (norm2, mlp, ls2, drop_path2 as in timm):

    post          out = z + A(z),  z = y + f(y)                                        (Adapter+)
    pre           y' = y + A(y),   out = y' + f(y')
    pfeiffer      z = y + f(y),    out = y + f(y) + A(z)     (= post for a pre-norm block, as in the paper)
    intermediate  out = y + f(y) + A(f(y))
    houlsby       y = x + a + A_attn(a) (a = attention branch),  out = y + f(y) + A(f(y))
    parallel      out = y + f(y) + A(y)

Adapters are registered as ``block.adapter`` (and ``block.adapter_attn`` for houlsby), the names the
`adapter-plus` package uses, so its checkpoints map key by key (load_adapter_plus_state_dict).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import check_backend
from ..modules import Adapter, AdapterBank, AdapterConfig, make_adapter

__all__ = ["add_adapters", "remove_adapters", "find_blocks", "load_adapter_plus_state_dict", "adapter_plus_key_map"]

_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """timm transformer blocks of `model` (recognised by structure, from a timm module)."""
    return [(n, m) for n, m in model.named_modules()
            if type(m).__module__.startswith("timm.") and all(hasattr(m, a) for a in _BLOCK_ATTRS)]


def _attn_branch(self, x):
    return self.drop_path1(self.ls1(self.attn(self.norm1(x))))


def _mlp_branch(self, x):
    return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _post(self, x):
    x = x + _attn_branch(self, x)
    x = x + _mlp_branch(self, x)
    return self.adapter(x, skip=x)


def _pre(self, x):
    x = x + _attn_branch(self, x)
    x = self.adapter(x, skip=x)
    return x + _mlp_branch(self, x)


def _pfeiffer(self, x):
    y = x + _attn_branch(self, x)
    f = _mlp_branch(self, y)
    return self.adapter(y + f, skip=f) + y


def _intermediate(self, x):
    x = x + _attn_branch(self, x)
    f = _mlp_branch(self, x)
    return x + self.adapter(f, skip=f)


def _houlsby(self, x):
    a = _attn_branch(self, x)
    x = x + self.adapter_attn(a, skip=a)
    f = _mlp_branch(self, x)
    return x + self.adapter(f, skip=f)


def _parallel(self, x):
    y = x + _attn_branch(self, x)
    return self.adapter(y, skip=y + _mlp_branch(self, y))


_FORWARDS = {"post": _post, "pre": _pre, "pfeiffer": _pfeiffer, "intermediate": _intermediate,
             "houlsby": _houlsby, "parallel": _parallel}


class _BlockForward:
    """The block's forward with its adapters, set as the instance attribute ``block.forward``. An object
    of a module-level class (not a bound function), so copy.deepcopy maps it to the copied block and
    torch.save pickles it; the position is kept by name."""

    def __init__(self, block: nn.Module, position: str):
        self.block, self.position = block, position

    def __call__(self, x):
        return _FORWARDS[self.position](self.block, x)


def remove_adapters(model: nn.Module) -> List[str]:
    """Undo add_adapters on the timm blocks of `model`; returns the names of the adapters removed."""
    from ..inference import unfuse_for_inference

    unfuse_for_inference(model)  # a fused block (and a fused attn.proj) gets add_adapters' forward back first
    removed = []
    for name, block in find_blocks(model):
        if not isinstance(block.__dict__.get("forward"), _BlockForward):
            continue
        del block.forward  # the class's forward shows again
        for site in ("adapter", "adapter_attn"):
            if isinstance(getattr(block, site, None), (Adapter, AdapterBank)):
                delattr(block, site)
                removed.append(f"{name}.{site}" if name else site)
    return removed


def add_adapters(model: nn.Module, config: AdapterConfig, *, backend: str = "auto", freeze: bool = True,
                 trainable: Tuple[str, ...] = ("head",), adapters: Optional[Sequence[str]] = None) -> List[str]:
    """Add a fused adapter to every timm Block at ``config.position``; returns the adapters' names.

    freeze=True leaves only the adapters and the modules named in ``trainable`` (the classifier
    ``head`` by default) trainable, as in Adapter+ training.
    """
    from .hf import _check_config

    _check_config(model, config)
    check_backend(backend)
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError("no timm VisionTransformer Block found (expected modules with "
                         f"{', '.join(_BLOCK_ATTRS)} from a timm module)")
    ref = next(model.parameters())
    added = []
    for name, block in blocks:
        dim = block.mlp.fc2.out_features if hasattr(block.mlp, "fc2") else block.norm1.normalized_shape[0]
        sites = ("adapter", "adapter_attn") if config.position == "houlsby" else ("adapter",)
        for site in sites:
            a = make_adapter(dim, config, adapters, backend=backend).to(device=ref.device, dtype=ref.dtype)
            a.train(model.training)
            block.add_module(site, a)
            added.append(f"{name}.{site}" if name else site)
        block.forward = _BlockForward(block, config.position)
    if freeze:
        adapter_names = tuple(n + "." for n in added)
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.startswith(adapter_names) or any(pname.startswith(t + ".") for t in trainable))
    return added


def adapter_plus_key_map(key: str) -> str:
    """The adapterfuse key for an `adapter-plus` state-dict key (unchanged when it is not an adapter's)."""
    for site in ("adapter_attn", "adapter"):
        marker = f".{site}."
        if marker not in f".{key}":
            continue
        head, _, tail = f".{key}".partition(marker)
        tail = {"bottleneck.1.weight": "down.weight", "bottleneck.1.bias": "down.bias",
                "bottleneck.4.weight": "up.weight", "bottleneck.4.bias": "up.bias",
                "scaling": "scale"}.get(tail, tail)
        return f"{head}{marker}{tail}"[1:]
    return key


def load_adapter_plus_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], *,
                                 strict: bool = False) -> Dict[str, list]:
    """Load a checkpoint trained with the `adapter-plus` package into a model prepared by add_adapters
    with the same position and bottleneck. Backbone and head keys load as they are; adapter keys are
    renamed. A checkpoint with adapter LayerNorms (``norm_a``, norm_layer=True) or adapter dropout
    modules with parameters is refused: the fused adapter has no norm inside.

    Returns {"missing": [...], "unexpected": [...]} as torch's load_state_dict reports them.
    """
    mapped = {}
    for key, value in state_dict.items():
        if ".norm_a." in key:
            raise ValueError(f"checkpoint key {key!r}: adapters with a LayerNorm inside (norm_layer=True) are not "
                             "supported by adapterfuse's fused adapter")
        new = adapter_plus_key_map(key)
        if new.endswith((".adapter.scale", ".adapter_attn.scale")):
            target = dict(model.named_modules()).get(new.rsplit(".", 1)[0])
            if target is not None and not isinstance(target.scale, torch.Tensor):
                raise ValueError(f"checkpoint key {key!r} holds a learned scale but the model's adapter has the "
                                 f"fixed scale {target.scale}; add_adapters with scaling='learned'/'channel'")
        mapped[new] = value
    result = model.load_state_dict(mapped, strict=strict)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
