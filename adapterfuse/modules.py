"""Drop-in modules. They hold parameters and draw the drop-path mask; the math lives in
adapterfuse.functional.fused_adapter."""
from __future__ import annotations

import math
import numbers
import contextlib
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._checks import ACTIVATIONS, as_float, as_int, check_backend, check_dropout
from .functional import fused_adapter

__all__ = ["Adapter", "AdapterBank", "AdapterConfig", "LoRALinear", "POSITIONS", "INITS", "adapter_index", "make_adapter"]

#: where an adapter sits in a transformer block (the positions the Adapter+ paper studies):
#: post / pre: after / before the FFN (sequential, residual inside), intermediate: after the FFN
#: before its residual add, pfeiffer: after the FFN only (Pfeiffer 2020), houlsby: after attention and
#: after the FFN (Houlsby 2019), parallel: beside the FFN, its output added to the FFN's.
POSITIONS = ("post", "pre", "intermediate", "pfeiffer", "houlsby", "parallel")
INITS = ("houlsby", "lora", "bert")
ScalingSpec = Union[float, int, str]


@dataclass(frozen=True)
class AdapterConfig:
    """How to build one adapter. The presets follow the papers; change fields with dataclasses.replace
    or by passing keyword arguments to the preset."""

    bottleneck: int = 8
    activation: str = "gelu"
    scaling: ScalingSpec = 1.0  # a float, "learned" (one parameter) or "channel" (one per feature)
    bias: bool = True
    init: str = "houlsby"
    drop_path: float = 0.0
    position: str = "post"
    #: a LayerNorm on the adapter's input (AdapterHub's ln_before; the skip stays unnormalised), fused into the op
    layer_norm: bool = False
    #: dropout on the adapter branch in training (AdapterHub's adapter dropout), fused into the op
    dropout: float = 0.0

    def __post_init__(self):
        bottleneck, scaling, drop_path = _check_spec(self.bottleneck, self.activation, self.scaling, self.init,
                                                     self.drop_path)
        object.__setattr__(self, "bottleneck", bottleneck)  # NumPy numbers become Python ones
        object.__setattr__(self, "scaling", scaling)
        object.__setattr__(self, "drop_path", drop_path)
        object.__setattr__(self, "dropout", check_dropout(self.dropout))
        if not isinstance(self.layer_norm, bool):
            raise TypeError(f"layer_norm must be a bool, got {type(self.layer_norm).__name__}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")

    @classmethod
    def adapter_plus(cls, bottleneck: int = 8, **kw) -> "AdapterConfig":
        """Adapter+ (Steitz & Roth, CVPR 2024): post position, GELU, bias, Houlsby init, channel-wise
        scaling, drop-path 0.1, no layer norm inside the adapter."""
        return replace(cls(bottleneck=bottleneck, activation="gelu", scaling="channel", bias=True,
                           init="houlsby", drop_path=0.1, position="post"), **kw)

    @classmethod
    def houlsby(cls, bottleneck: int = 8, **kw) -> "AdapterConfig":
        """Houlsby et al. 2019: adapters after attention and after the FFN, near-identity init
        (truncated normal, std 0.01), scale 1; swish as in AdapterHub's Houlsby config."""
        return replace(cls(bottleneck=bottleneck, activation="silu", scaling=1.0, bias=True, init="houlsby",
                           drop_path=0.0, position="houlsby"), **kw)

    @classmethod
    def pfeiffer(cls, bottleneck: int = 8, **kw) -> "AdapterConfig":
        """Pfeiffer et al. 2020: one adapter after the FFN, ReLU, BERT init, scale 1."""
        return replace(cls(bottleneck=bottleneck, activation="relu", scaling=1.0, bias=True, init="bert",
                           drop_path=0.0, position="pfeiffer"), **kw)

    @classmethod
    def parallel(cls, bottleneck: int = 8, **kw) -> "AdapterConfig":
        """Parallel adapter (He et al. 2022): beside the FFN, ReLU, LoRA-style init (up = 0), scale 4."""
        return replace(cls(bottleneck=bottleneck, activation="relu", scaling=4.0, bias=True, init="lora",
                           drop_path=0.0, position="parallel"), **kw)


def _check_spec(bottleneck, activation, scaling, init, drop_path):
    """Validate an adapter's hyper-parameters; returns (bottleneck, scaling, drop_path) normalised to
    Python numbers (NumPy integers and floats are accepted, bools are not)."""
    bottleneck = as_int("bottleneck", bottleneck)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if isinstance(scaling, str):
        if scaling not in ("learned", "channel"):
            raise ValueError(f"scaling must be a float, 'learned' or 'channel', got {scaling!r}")
    else:
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"scaling must be a float, 'learned' or 'channel', got {type(scaling).__name__}")
        scaling = float(scaling)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    drop_path = as_float("drop_path", drop_path)
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
    return bottleneck, scaling, drop_path


@torch.no_grad()
def _init_weights(scheme: str, down_w, down_b, up_w, up_b, scale) -> None:
    """The init schemes of Adapter.reset_parameters, for one adapter ([r, d] / [d, r] weights) or a bank
    ([A, r, d] / [A, d, r]: each member initialised as its own nn.Linear)."""
    downs = down_w if down_w.dim() == 3 else down_w.unsqueeze(0)
    ups = up_w if up_w.dim() == 3 else up_w.unsqueeze(0)
    for dw, uw_out in zip(downs, ups):
        # (an up-projection stored transposed, as AdapterBank keeps it, is drawn contiguous and copied in: the same
        # values per element as an Adapter's under the same seed)
        uw = uw_out if uw_out.is_contiguous() else torch.empty_like(uw_out, memory_format=torch.contiguous_format)
        if scheme == "houlsby":
            for w in (dw, uw):
                nn.init.trunc_normal_(w, std=0.01, a=-0.02, b=0.02)
        elif scheme == "bert":
            for w in (dw, uw):
                nn.init.normal_(w, std=0.02)
        else:
            nn.init.kaiming_uniform_(dw, a=math.sqrt(5))
            nn.init.zeros_(uw)
        if uw is not uw_out:
            uw_out.copy_(uw)
    for b in (down_b, up_b):
        if b is not None:
            nn.init.zeros_(b)
    if isinstance(scale, nn.Parameter):
        scale.fill_(1.0)


def _drop_path_scale(x: torch.Tensor, drop_path: float, training: bool) -> Optional[torch.Tensor]:
    """Stochastic depth on the adapter branch: a per-sample keep mask / keep probability, in training only."""
    if not training or drop_path == 0.0:
        return None
    keep = 1.0 - drop_path
    return x.new_empty(x.shape[0], dtype=torch.float32).bernoulli_(keep).div_(keep)


class Adapter(nn.Module):
    """Bottleneck adapter ``y = skip + g * scale * up(act(down(x)))`` as one fused op.

    ``forward(x, skip=None)``: with ``skip=None`` it returns the scaled adapter branch alone; pass
    ``skip=x`` for the sequential form ``x + A(x)`` (x is then read once), or another tensor for a
    parallel adapter (``skip`` = the output of the block it sits beside). Drop-path (stochastic depth,
    per sample along dim 0 of x) acts on the adapter branch in training mode only. ``layer_norm=True`` puts a
    LayerNorm (``self.norm``) on the adapter's input, ``dropout`` drops elements of the adapter branch in
    training mode; both run inside the fused op (fused_adapter's layer_norm / dropout).
    """

    def __init__(self, dim: int, bottleneck: int, *, activation: str = "gelu", scaling: ScalingSpec = 1.0,
                 bias: bool = True, init: str = "houlsby", drop_path: float = 0.0, backend: str = "auto",
                 layer_norm: bool = False, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        bottleneck, scaling, drop_path = _check_spec(bottleneck, activation, scaling, init, drop_path)
        dim = as_int("dim", dim)
        check_backend(backend)
        self.dim, self.bottleneck = dim, bottleneck
        self.activation, self.init_scheme = activation, init
        self.drop_path, self.backend = float(drop_path), backend
        self.dropout = check_dropout(dropout)
        #: the input LayerNorm (layer_norm=True), else None
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype) if layer_norm else None
        self.down = nn.Linear(dim, bottleneck, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, bias=bias, device=device, dtype=dtype)
        if scaling == "learned":
            self.scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        elif scaling == "channel":
            self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            self.scale = float(scaling)
        #: set by adapterfuse.merge when the adapter's function now lives in a Linear's weights:
        #: forward then returns the skip unchanged (the adapter branch is already in it)
        self.merged = False
        #: set by add_adapters: ("after", qualified Linear name) when the adapter's input is that Linear's
        #: output, ("beside", name) when it shares that Linear's input; None when neither (merge folds
        #: only the scale then)
        self.attached_to = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, config: AdapterConfig, **kw) -> "Adapter":
        return cls(dim, config.bottleneck, activation=config.activation, scaling=config.scaling,
                   bias=config.bias, init=config.init, drop_path=config.drop_path, layer_norm=config.layer_norm,
                   dropout=config.dropout, **kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """houlsby: both weights ~ N(0, 0.01^2) truncated at +-2 std; bert: N(0, 0.02^2);
        lora: down kaiming-uniform(a=sqrt(5)) like nn.Linear, up zeros. Biases zero; scales one; the input
        LayerNorm (if any) the identity."""
        _init_weights(self.init_scheme, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scale)
        if self.norm is not None:
            self.norm.reset_parameters()

    def _sample_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return _drop_path_scale(x, self.drop_path, self.training)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.merged:
            return skip if skip is not None else torch.zeros_like(x)
        norm = self.norm
        return fused_adapter(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                             scale=self.scale, activation=self.activation, skip=skip,
                             sample_scale=self._sample_scale(x),
                             layer_norm=None if norm is None else (norm.weight, norm.bias, norm.eps),
                             dropout=self.dropout if self.training else 0.0, backend=self.backend)

    def extra_repr(self) -> str:
        s = self.scale if isinstance(self.scale, float) else f"Parameter{list(self.scale.shape)}"
        return (f"dim={self.dim}, bottleneck={self.bottleneck}, activation={self.activation!r}, scale={s}, "
                f"drop_path={self.drop_path}, dropout={self.dropout}, backend={self.backend!r}")


class AdapterBank(nn.Module):
    """A adapters of one shape in one module, run together by adapterfuse.fused_adapter_bank: every sample (or
    row) goes through the adapter its id names, all of them in one call per direction.

    ``forward(x, adapter_index, skip=None)``: adapter_index is ``[B]`` (per sample) or ``[M]`` (per row of x
    flattened) with ids in [-1, A), -1 = no adapter; names map to ids through ``index``. The options are
    Adapter's, applied to every member (``AdapterBank.from_config``). Parameters: ``down_weight`` [A, r, d],
    ``down_bias`` [A, r], ``up_weight`` [A, d, r] (stored as [A, r, d] transposed, strides (r d, 1, d), which the
    CPU kernels read without a per-call transpose; state dicts hold the same [A, d, r] values), ``up_bias`` [A, d],
    ``scale`` [A] ("learned") or [A, d] ("channel"). ``adapter(i)`` returns a member as a plain Adapter, ``set_adapter(i, adapter)`` puts one in.
    """

    def __init__(self, dim: int, bottleneck: int, names_or_count: Union[int, Sequence[str]], *,
                 activation: str = "gelu", scaling: ScalingSpec = 1.0, bias: bool = True, init: str = "houlsby",
                 drop_path: float = 0.0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        bottleneck, scaling, drop_path = _check_spec(bottleneck, activation, scaling, init, drop_path)
        dim = as_int("dim", dim)
        check_backend(backend)
        if isinstance(names_or_count, (str, bytes)):
            raise TypeError("names_or_count must be a count or a list of names, got one string")
        if isinstance(names_or_count, numbers.Integral) and not isinstance(names_or_count, bool):
            names = tuple(str(i) for i in range(as_int("names_or_count", names_or_count)))
        else:
            names = tuple(names_or_count)
            if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
                raise ValueError(f"names must be distinct strings (at least one), got {list(names)!r}")
        a = len(names)
        self.names = names
        self.dim, self.bottleneck = dim, bottleneck
        self.activation, self.init_scheme, self.scaling = activation, init, scaling
        self.drop_path, self.backend = float(drop_path), backend
        kw = dict(device=device, dtype=dtype)
        self.down_weight = nn.Parameter(torch.empty(a, bottleneck, dim, **kw))
        # [A, d, r] stored as [A, r, d] (each member's w_up transposed in memory, strides (r d, 1, d)): the CPU
        # bank kernels read each adapter's up-projection rows as they are instead of transposing it per call
        # (0.8 us per adapter and direction at d = 768, r = 8: most of what 64 adapters per token cost over one) and
        # return its gradient in the same layout (docs/design.md, Adapter bank)
        self.up_weight = nn.Parameter(torch.empty(a, bottleneck, dim, **kw).transpose(1, 2))
        self.down_bias = nn.Parameter(torch.empty(a, bottleneck, **kw)) if bias else None
        self.up_bias = nn.Parameter(torch.empty(a, dim, **kw)) if bias else None
        if scaling == "learned":
            self.scale = nn.Parameter(torch.ones(a, **kw))
        elif scaling == "channel":
            self.scale = nn.Parameter(torch.ones(a, dim, **kw))
        else:
            self.scale = float(scaling)
        #: the ids a forward without an explicit index uses (set by adapterfuse.adapter_index for a whole model)
        self.current_index: Optional[torch.Tensor] = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, config: AdapterConfig, names_or_count, **kw) -> "AdapterBank":
        if config.layer_norm or config.dropout:
            raise ValueError("an AdapterBank has no input LayerNorm or dropout (fused_adapter_bank has no kernels for "
                             "them); use a config with layer_norm=False and dropout=0, or one Adapter per task")
        return cls(dim, config.bottleneck, names_or_count, activation=config.activation, scaling=config.scaling,
                   bias=config.bias, init=config.init, drop_path=config.drop_path, **kw)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every member initialised as Adapter.reset_parameters initialises one adapter."""
        _init_weights(self.init_scheme, self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.scale)

    def __len__(self) -> int:
        return len(self.names)

    def _id(self, key: Union[int, str]) -> int:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"no adapter named {key!r} in this bank; it holds {list(self.names)}")
            return self.names.index(key)
        i = as_int("adapter id", key, minimum=-len(self.names))
        if i >= len(self.names):
            raise IndexError(f"adapter id {i} out of range for a bank of {len(self.names)}")
        return i % len(self.names)

    def index(self, names: Sequence[Optional[str]], device=None) -> torch.Tensor:
        """adapter_index for a list of names (None: no adapter), e.g. bank.index(["task_a", None, "task_b"])."""
        return torch.tensor([-1 if n is None else self._id(n) for n in names], dtype=torch.int64, device=device)

    def forward(self, x: torch.Tensor, adapter_index: Optional[torch.Tensor] = None,
                skip: Optional[torch.Tensor] = None):
        from .functional import fused_adapter_bank

        if adapter_index is None:  # inside a model: set by `with adapterfuse.adapter_index(model, ids)`
            adapter_index = self.current_index
            if adapter_index is None:
                raise ValueError("this AdapterBank needs the adapter of every sample: call it as bank(x, ids), or "
                                 "run the model inside `with adapterfuse.adapter_index(model, ids):`")
        return fused_adapter_bank(x, self.down_weight, self.down_bias, self.up_weight, self.up_bias, adapter_index,
                                  scale=self.scale, activation=self.activation, skip=skip,
                                  sample_scale=_drop_path_scale(x, self.drop_path, self.training),
                                  backend=self.backend)

    @torch.no_grad()
    def adapter(self, key: Union[int, str]) -> Adapter:
        """Member `key` (id or name) as a plain Adapter with copies of its weights (same options, device, dtype)."""
        i = self._id(key)
        out = Adapter(self.dim, self.bottleneck, activation=self.activation, scaling=self.scaling,
                      bias=self.down_bias is not None, init=self.init_scheme, drop_path=self.drop_path,
                      backend=self.backend, device=self.down_weight.device, dtype=self.down_weight.dtype)
        out.down.weight.copy_(self.down_weight[i])
        out.up.weight.copy_(self.up_weight[i])
        if self.down_bias is not None:
            out.down.bias.copy_(self.down_bias[i])
            out.up.bias.copy_(self.up_bias[i])
        if isinstance(self.scale, nn.Parameter):
            out.scale.copy_(self.scale[i].reshape(out.scale.shape))
        return out.train(self.training)

    @torch.no_grad()
    def set_adapter(self, key: Union[int, str], adapter: Adapter) -> None:
        """Copy a separately trained Adapter into member `key`; its shape and options must match the bank's."""
        i = self._id(key)
        if not isinstance(adapter, Adapter):
            raise TypeError(f"set_adapter takes an adapterfuse.Adapter, got {type(adapter).__name__}")
        if adapter.norm is not None or adapter.dropout:
            raise ValueError("an adapter with an input LayerNorm or dropout does not fit an AdapterBank (the bank "
                             "has neither)")
        mine = (self.dim, self.bottleneck, self.activation, self.down_bias is not None)
        theirs = (adapter.dim, adapter.bottleneck, adapter.activation, adapter.down.bias is not None)
        if mine != theirs:
            raise ValueError(f"the adapter (dim, bottleneck, activation, bias) = {theirs} does not fit this bank's "
                             f"{mine}")
        if isinstance(self.scale, float):
            if not isinstance(adapter.scale, float) or adapter.scale != self.scale:
                raise ValueError(f"the bank's scale is the constant {self.scale}; the adapter's is {adapter.scale!r}")
        else:
            if isinstance(adapter.scale, float):
                self.scale[i].fill_(adapter.scale)
            elif adapter.scale.numel() == 1:
                self.scale[i].copy_(adapter.scale.reshape(()).expand_as(self.scale[i]))
            elif self.scaling == "channel":
                self.scale[i].copy_(adapter.scale)
            else:
                raise ValueError("a channel-scaled adapter does not fit a bank with one learned scale per adapter")
        self.down_weight[i].copy_(adapter.down.weight)
        self.up_weight[i].copy_(adapter.up.weight)
        if self.down_bias is not None:
            self.down_bias[i].copy_(adapter.down.bias)
            self.up_bias[i].copy_(adapter.up.bias)

    def extra_repr(self) -> str:
        s = self.scale if isinstance(self.scale, float) else f"Parameter{list(self.scale.shape)}"
        return (f"dim={self.dim}, bottleneck={self.bottleneck}, adapters={list(self.names)}, "
                f"activation={self.activation!r}, scale={s}, drop_path={self.drop_path}, backend={self.backend!r}")


def make_adapter(dim: int, config: AdapterConfig, adapters: Optional[Sequence[str]] = None, **kw) -> nn.Module:
    """One adapter site of add_adapters: an Adapter, or an AdapterBank holding `adapters` (names)."""
    if adapters is None:
        return Adapter.from_config(dim, config, **kw)
    return AdapterBank.from_config(dim, config, list(adapters), **kw)


@contextlib.contextmanager
def adapter_index(model: nn.Module, ids):
    """``with adapterfuse.adapter_index(model, ids): model(...)``: the adapter each sample uses in every
    AdapterBank of `model` (add_adapters(..., adapters=[...])) for the forwards inside the block. ids: an
    integer tensor ([B] per sample, or [M] per row) or a list of names (None: no adapter). Training works:
    each bank member gets the gradients of its own samples."""
    banks = [m for m in model.modules() if isinstance(m, AdapterBank)]
    if not banks:
        raise ValueError("adapter_index: the model has no AdapterBank (add them with "
                         "add_adapters(model, config, adapters=[...]))")
    device = banks[0].down_weight.device
    if isinstance(ids, torch.Tensor):
        idx = ids.to(device)
    else:
        idx = banks[0].index(list(ids), device=device)
    previous = [b.current_index for b in banks]
    for b in banks:
        b.current_index = idx
    try:
        yield idx
    finally:
        for b, p in zip(banks, previous):
            b.current_index = p


class LoRALinear(nn.Module):
    """The LoRA baseline with PEFT's maths: ``y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r``.

    A (``lora_A``, [r, in]) is kaiming-uniform initialised, B (``lora_B``, [out, r]) zeros, as in PEFT.
    The base layer is frozen unless ``freeze_base=False``. ``merge()`` folds ``B @ A * scaling`` into
    the base weight (refusing non-finite results, like PEFT's safe_merge) and ``unmerge()`` restores the
    exact original weight (kept aside while merged, so merge/unmerge round-trips bit for bit).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: Optional[float] = None, dropout: float = 0.0,
                 freeze_base: bool = True):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        r = as_int("r", r)
        if alpha is not None:
            alpha = as_float("alpha", alpha)
        self.base, self.r = base, r
        self.scaling = float(alpha if alpha is not None else r) / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)
        self._original: Optional[torch.Tensor] = None
        # checkpoints hold the unmerged base weight; loading into a merged layer is refused
        self._register_state_dict_hook(_lora_state_dict_hook)
        self._register_load_state_dict_pre_hook(_lora_load_hook, with_module=True)

    @property
    def merged(self) -> bool:
        return self._original is not None

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        if self.merged:
            return
        new = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        if safe and not torch.isfinite(new).all():
            raise ValueError("LoRALinear.merge: the merged weight has non-finite values; not merged")
        self._original = self.base.weight.detach().clone()
        self.base.weight.copy_(new)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.copy_(self._original)
            self._original = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.t().to(x.dtype) @ self.lora_B.t().to(x.dtype)) * self.scaling


def _lora_state_dict_hook(module: LoRALinear, state_dict, prefix, local_metadata):
    if module.merged:
        state_dict[prefix + "base.weight"] = module._original.clone()


def _lora_load_hook(module: LoRALinear, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs):
    if module.merged and any(k.startswith(prefix) for k in state_dict):
        error_msgs.append(f"{prefix or 'LoRALinear'}: the LoRA layer is merged; state dicts hold the unmerged base "
                          "weight, so call unmerge() (or adapterfuse.unmerge(model)) before load_state_dict")
