"""fused_adapter: validates the inputs, picks a backend and returns y (docs/design.md: Math, Backends and dispatch, Bad input).

    y = skip + sample_scale[b] * scale * (act(x @ w_down.T + b_down) @ w_up.T + b_up)

Backends: "torch" (the reference), "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cpu" and "cuda" (the C++/CUDA extension). ``backend="auto"`` (or the ADAPTERFUSE_BACKEND environment
variable) picks, per call: CUDA tensors -> "triton" where available; CPU tensors -> "cpu" where the
extension is built, except bfloat16 (measured slower than eager there); otherwise, and for float64,
the reference.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ._checks import (BACKENDS, FUSED_DTYPES, Scale, as_int, check_adapter_args, check_bank_args, check_bank_ids,
                      check_dropout, check_layer_norm, check_linear_adapter_args, check_linear_layer_norm,
                      kernel_index)
from .ops import registry
from .ops._common import as_rows
from .reference import adapter_bank_reference, adapter_reference, dropout_keep, linear_adapter_reference

__all__ = ["fused_adapter", "fused_adapter_bank", "fused_linear_adapter", "has_bank_kernels", "has_ln_dropout_kernels", "available_backends", "backend_status", "resolve_backend"]

def _unavailable_reason(name: str, build: bool = True) -> Optional[str]:
    """None when the backend can run on this machine, else a sentence saying what is missing. The C++
    extension is built here on first use; with build=False nothing is built and NOT_BUILT says so."""
    if name == "torch":
        return None
    try:
        mod = registry.get(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("adapterfuse"):
            return f"the {name} backend is not part of this build of adapterfuse"
        return f"importing the {name} backend failed: {e}"
    return mod.unavailable_reason(build)


def backend_status() -> dict:
    """{backend: None if ready, NOT_BUILT ("not built yet, builds on first use") for the C++ extension before
    its first build, else the reason it cannot run here}, for every backend. Builds nothing."""
    return {name: _unavailable_reason(name, build=False) for name in BACKENDS if name != "auto"}


def available_backends() -> list:
    """The backends that can run on this machine, e.g. ['torch', 'triton'] (including an extension backend
    that is not built yet: it builds on first use). Builds nothing."""
    from .ops._extension import NOT_BUILT

    return [name for name, why in backend_status().items() if why is None or why == NOT_BUILT]


# The environment variables a resolution depends on besides the call.
_ENV_KEYS = ("ADAPTERFUSE_BACKEND", "TRITON_INTERPRET", "ADAPTERFUSE_CUDA_EMULATION")
# (backend, device type, dtype, *environment) -> backend name, for eager calls: each key is resolved once
# (what is installed and built is itself cached per process). Errors are not cached.
_RESOLVED: dict = {}
# The differentiable fused op and the backend module of every backend resolved so far; filled by _resolve so
# that fused_adapter reads plain dicts (dynamo cannot trace the imports behind them).
_FUNCTIONS: dict = {}
_BACKENDS: dict = {}


def clear_resolution_cache() -> None:
    """Forget cached backend resolutions (after changing what is installed or built in this process)."""
    _RESOLVED.clear()


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend for a call on x; raises ValueError/TypeError for an unusable forced backend.
    Eager calls hit a per-process cache (no per-call resolution work); under torch.compile the resolution
    is a constant-folded call of _resolve."""
    env = os.environ
    key = (backend, x.device.type, x.dtype, env.get(_ENV_KEYS[0], ""), env.get(_ENV_KEYS[1], ""),
           env.get(_ENV_KEYS[2], ""))
    if torch.compiler.is_compiling():
        return _resolve(*key)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve(*key)
    return name


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its cost at import: the public decorator imports
    torch._dynamo (and with it triton) only to set this marker, which dynamo reads when it traces a call.
    tests/test_compile.py (fullgraph, no graph break) and tests/test_lean_import.py hold both ends."""
    fn._dynamo_marked_constant = True
    return fn


def _runs_on(name: str, device_type: str) -> bool:
    return name == "torch" or registry.get(name).runs_on(device_type)


@_assume_constant_result
def _resolve(backend: str, device_type: str, dtype: torch.dtype, env_backend: str, interpret: str,
             emulation: str) -> str:
    # A pure function of constants (the environment is passed in), so torch.compile runs it once while
    # tracing (it imports modules, which dynamo cannot trace) and treats the name as a constant: no graph break.
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto" and env_backend:
        if env_backend not in BACKENDS:
            raise ValueError(f"the environment variable ADAPTERFUSE_BACKEND must be one of {list(BACKENDS)}, got "
                             f"{env_backend!r}")
        # the variable steers the calls its backend can run (device, dtype, availability); the others
        # (float64, meta tensors, CUDA tensors under ADAPTERFUSE_BACKEND=cpu, ...) keep auto's choice
        if env_backend == "torch" or (env_backend != "auto" and _runs_on(env_backend, device_type)
                                      and dtype in FUSED_DTYPES and _unavailable_reason(env_backend) is None
                                      and _can_call(env_backend, device_type, dtype)):
            backend = env_backend
    if backend == "auto":
        name = "torch"
        # Measured (benchmarks/NOTES.md): on CPU the C++ path wins in fp32 (2-3x eager) and fp16 (7-13x),
        # but in bf16 eager torch's native oneDNN bf16 GEMMs beat its fp32 sgemms on upcast blocks.
        if dtype in FUSED_DTYPES and not (device_type == "cpu" and dtype == torch.bfloat16):
            for cand in (("triton", "cuda") if device_type == "cuda" else ("cpu",)):
                if _runs_on(cand, device_type) and _unavailable_reason(cand) is None:
                    name = cand
                    break
    elif backend == "torch":
        name = "torch"
    else:
        why = _unavailable_reason(backend)
        if why is not None:
            raise ValueError(f"backend={backend!r} is not available: {why}")
        if not _runs_on(backend, device_type):
            need = {"cuda": "CUDA tensors", "cpu": "CPU tensors",
                    "triton": "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"}[backend]
            raise ValueError(f"backend={backend!r} needs {need}, got x on {device_type}")
        if dtype not in FUSED_DTYPES:
            raise TypeError(f"backend={backend!r} supports float32, float16 and bfloat16, got x of dtype {dtype}; "
                            "use backend='torch' for other dtypes")
        registry.get(backend).check_call(device_type, dtype)
        name = backend
    if name != "torch":
        module = registry.get(name)
        _FUNCTIONS[name] = module.fused
        _BACKENDS[name] = module
    return name


def _can_call(name: str, device_type: str, dtype: torch.dtype) -> bool:
    try:
        registry.get(name).check_call(device_type, dtype)
    except (TypeError, ValueError):
        return False
    return True


def _autocast_all(*tensors):
    """Under torch.autocast, every floating tensor cast to the autocast dtype (as F.linear casts its operands)."""
    x = tensors[0]
    dev = x.device.type if isinstance(x, torch.Tensor) else None
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _autocast(x, w_down, b_down, w_up, b_up, skip):
    """Under torch.autocast, cast the matmul operands to the autocast dtype like F.linear would (a skip that
    is x stays x)."""
    cast = _autocast_all(x, w_down, b_down, w_up, b_up, skip)
    return cast[:5] + ((cast[0] if skip is x else cast[5]),)


def _scale_operand(scale):
    """(scale tensor [1] / [d] or None, scale_value): the schema's two scale arguments."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(-1), 1.0
    return None, float(scale)


def _row_operands(x, skip, d: int):
    """(skip is x, x as [M, d] rows, a separate skip as rows or None): the layout every kernel takes (as_rows)."""
    skip_is_x = skip is x
    return skip_is_x, as_rows(x, d), None if skip is None or skip_is_x else as_rows(skip, d)


def fused_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    scale: Scale = 1.0,
    activation: str = "gelu",
    skip: Optional[torch.Tensor] = None,
    sample_scale: Optional[torch.Tensor] = None,
    layer_norm=None,
    dropout: float = 0.0,
    dropout_seed=None,
    backend: str = "auto",
) -> torch.Tensor:
    """The bottleneck adapter as one fused op.

        y = skip + sample_scale[b] * dropout(scale * (act(LN(x) @ w_down.T + b_down) @ w_up.T + b_up))

    Args:
        x: ``[..., d]`` input.
        w_down, b_down: ``[r, d]`` and ``[r]`` (or None): ``nn.Linear(d, r)``.
        w_up, b_up: ``[d, r]`` and ``[d]`` (or None): ``nn.Linear(r, d)``.
        scale: a float, a one-element tensor (learned scalar) or a ``[d]`` tensor (Adapter+ channel scaling).
        activation: "relu", "gelu" (erf), "gelu_tanh", "silu" or "identity".
        skip: None (no residual) or a tensor shaped like x; pass x itself for ``x + adapter(x)``
            (the fused kernels then read x once).
        sample_scale: None or ``[B]`` (B = x.shape[0]): per-sample factor (drop-path, gating).
        layer_norm: None, or ``(weight, bias, eps)`` of a LayerNorm on the adapter's input (weight / bias ``[d]`` or
            None; e.g. ``(ln.weight, ln.bias, ln.eps)``); the skip stays x, unnormalised (AdapterHub's
            ``ln_before``). Fused: the normalisation happens in the kernel's first pass over x and the LayerNorm's
            weight and bias are folded into w_down / b_down (docs/design.md, LayerNorm and dropout inside the
            adapter); gradients reach weight and bias.
        dropout: probability (in [0, 1)) of dropping each element of the adapter branch (scale * u, before
            sample_scale and the skip), applied whenever > 0: pass 0 in eval, as F.dropout's training=False. The
            mask is reference.dropout_keep of a seed drawn from torch's default CPU generator (torch.manual_seed
            reproduces it), regenerated in the backward, never stored.
        dropout_seed: None (draw one), or the seed of the mask: an int in [0, 2^63) or a one-element int64 tensor
            (the same seed gives the same mask on every backend).
        backend: "auto", "torch", "triton", "cuda" or "cpu". The CUDA backend has no kernels for layer_norm /
            dropout and says so when forced (auto then picks Triton, or the reference).

    Returns:
        y, shaped like x, in x's dtype (the autocast dtype under torch.autocast).
    """
    if layer_norm is not None or dropout != 0.0:
        return _fused_adapter_ln_dropout(x, w_down, b_down, w_up, b_up, scale, activation, skip, sample_scale,
                                         layer_norm, dropout, dropout_seed, backend)
    x, w_down, b_down, w_up, b_up, skip = _autocast(x, w_down, b_down, w_up, b_up, skip)
    shape = check_adapter_args(x, w_down, b_down, w_up, b_up, scale, activation, skip, sample_scale)
    name = resolve_backend(backend, x)
    if name == "torch" or shape.d == 0:  # d = 0: y is empty, nothing for a kernel to do
        # (the reference still gives every gradient: b_down's is the zero it must be)
        return adapter_reference(x, w_down, b_down, w_up, b_up, scale=scale, activation=activation,
                                 skip=skip, sample_scale=sample_scale)

    refusal = _BACKENDS[name].shape_refusal(shape.r)
    if refusal is not None:
        if backend == "auto":  # auto never fails on a size the chosen kernels do not take: the reference runs
            return adapter_reference(x, w_down, b_down, w_up, b_up, scale=scale, activation=activation,
                                     skip=skip, sample_scale=sample_scale)
        raise ValueError(f"{refusal} (w_down {list(w_down.shape)})")
    skip_is_x, x2, skip2 = _row_operands(x, skip, shape.d)
    scale_t, scale_value = _scale_operand(scale)
    fn = _FUNCTIONS[name]
    y = fn(x2, w_down, b_down, w_up, b_up, scale_t, scale_value, skip2, skip_is_x, sample_scale,
           shape.tokens_per_sample, activation)
    return y.view(x.shape)


def _fold_layer_norm(w_down, b_down, ln_weight, ln_bias):
    """LN(x) @ w_down.T + b_down = x^ @ (w_down * weight).T + (b_down + w_down @ bias), x^ = (x - mean) rstd: the
    LayerNorm's affine folded into the down-projection ([r, d] work, differentiable, in fp32 then cast once)."""
    wd = w_down if ln_weight is None else (w_down.float() * ln_weight.float()).to(w_down.dtype)
    if ln_bias is not None:
        shift = w_down.float() @ ln_bias.float()
        b_down = (shift if b_down is None else b_down.float() + shift).to(w_down.dtype)
    return wd, b_down


def _dropout_factor(seed: torch.Tensor, shape, p: float, device, dtype) -> torch.Tensor:
    """The fused dropout's mask as a factor shaped like x: keep / (1 - p) (reference.dropout_keep)."""
    d = shape[-1]
    rows = math.prod(shape[:-1])
    keep = dropout_keep(seed.to(device), rows, d, p, device)
    return (keep.to(dtype) / (1.0 - p)).reshape(shape)


def _seed_tensor(seed) -> torch.Tensor:
    """dropout_seed as the op's one-element int64 CPU tensor; None draws one from torch's default CPU generator."""
    if seed is None:
        return torch.randint(0, 1 << 62, (1,), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise TypeError(f"dropout_seed must be an int or a one-element int64 tensor, got {seed.dtype} "
                            f"{list(seed.shape)}")
        return seed.reshape(1).cpu()
    seed = as_int("dropout_seed", seed, minimum=0)
    if seed >= 1 << 63:
        raise ValueError(f"dropout_seed must be < 2^63, got {seed}")
    return torch.tensor([seed], dtype=torch.int64)


def _fused_adapter_ln_dropout(x, w_down, b_down, w_up, b_up, scale, activation, skip, sample_scale, layer_norm,
                              dropout, dropout_seed, backend):
    """fused_adapter with an input LayerNorm and / or dropout: the adapter_ln_dropout op of the chosen backend."""
    is_x = skip is x
    ln_params = tuple(layer_norm[:2]) if isinstance(layer_norm, (tuple, list)) and len(layer_norm) == 3 else ()
    # under autocast the LayerNorm's weight and bias are cast with the weights they fold into
    x, w_down, b_down, w_up, b_up, skip, *ln_params = _autocast_all(x, w_down, b_down, w_up, b_up, skip, *ln_params)
    skip = x if is_x else skip
    shape = check_adapter_args(x, w_down, b_down, w_up, b_up, scale, activation, skip, sample_scale)
    ln = check_layer_norm(layer_norm if not ln_params else (*ln_params, layer_norm[2]), x)
    p = check_dropout(dropout)
    # one seed per call (a CPU tensor: no device sync, and no recompile when it changes)
    seed = _seed_tensor(dropout_seed) if p > 0 else None
    name = resolve_backend(backend, x)
    ops = None if name == "torch" else _BACKENDS[name].ln_dropout
    if ops is None and name != "torch" and backend != "auto":
        raise ValueError(f"backend={name!r} has no kernels for the adapter's input LayerNorm / dropout; use "
                         "backend='triton' (CUDA tensors), 'cpu' (CPU tensors), 'torch' or 'auto'")
    refusal = None if ops is None else (_BACKENDS[name].shape_refusal(shape.r)
                                        or _BACKENDS[name].ln_dropout_refusal(shape.r, x.dtype))
    if refusal is not None and backend != "auto":
        raise ValueError(f"{refusal} (w_down {list(w_down.shape)})")
    if ops is None or refusal is not None or shape.d == 0:
        mask = None if seed is None else _dropout_factor(seed, x.shape, p, x.device, x.dtype)
        return adapter_reference(x, w_down, b_down, w_up, b_up, scale=scale, activation=activation, skip=skip,
                                 sample_scale=sample_scale, layer_norm=ln, dropout_mask=mask)
    if ln is not None:
        w_down, b_down = _fold_layer_norm(w_down, b_down, ln[0], ln[1])
    skip_is_x, x2, skip2 = _row_operands(x, skip, shape.d)
    scale_t, scale_value = _scale_operand(scale)
    y = ops.fused(x2, w_down, b_down, w_up, b_up, scale_t, scale_value, skip2, skip_is_x, sample_scale,
                  shape.tokens_per_sample, activation, -1.0 if ln is None else ln[2], p, seed)
    return y.view(x.shape)


def has_ln_dropout_kernels(backend: str) -> bool:
    """Whether fused_adapter(..., layer_norm=... or dropout > 0, backend=backend) has kernels to run ("auto" and
    "torch" always can: auto falls back to the reference where the chosen backend has none)."""
    if backend in ("auto", "torch"):
        return True
    return registry.get(backend).ln_dropout is not None


def has_bank_kernels(backend: str) -> bool:
    """Whether fused_adapter_bank(..., backend=backend) can run without raising for want of bank kernels
    ("auto" and "torch" always can: they fall back to the reference)."""
    if backend in ("auto", "torch"):
        return True
    return registry.get(backend).bank is not None


def fused_adapter_bank(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    adapter_index: torch.Tensor,
    *,
    scale: Scale = 1.0,
    activation: str = "gelu",
    skip: Optional[torch.Tensor] = None,
    sample_scale: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Many adapters in one batch, in one call per direction (docs/design.md, Adapter bank): every row of x runs
    through the adapter its id names, with exactly the math of fused_adapter for that adapter.

    Args:
        x: ``[..., d]`` input.
        w_down, b_down: ``[A, r, d]`` and ``[A, r]`` (or None): A stacked ``nn.Linear(d, r)``.
        w_up, b_up: ``[A, d, r]`` and ``[A, d]`` (or None): A stacked ``nn.Linear(r, d)``.
        adapter_index: integer tensor, ``[B]`` (one id per sample, B = x.shape[0]) or ``[M]`` (one id per row
            of x flattened to ``[M, d]``); ids in [-1, A), -1 = no adapter (y = skip, or 0 without skip).
            Out-of-range ids raise ValueError (checked before any kernel; under torch.compile by the kernels).
        scale: a float, ``[A]`` (one learned scalar per adapter) or ``[A, d]`` (channel scaling per adapter).
        activation, skip, sample_scale: as in fused_adapter.
        backend: "auto" (the backend fused_adapter would choose: Triton for CUDA tensors, the C++ kernels for
            fp32 / fp16 CPU tensors; the reference where that backend has no bank kernels or refuses the shape),
            "torch", "triton" or "cpu". The CUDA backend has no bank kernels yet and says so when forced.

    Returns:
        y, shaped like x. Gradients flow to x, skip, every bank tensor (an adapter no row uses gets exactly
        zero), scale and sample_scale; never to adapter_index.
    """
    x, w_down, b_down, w_up, b_up, skip = _autocast(x, w_down, b_down, w_up, b_up, skip)
    shape = check_bank_args(x, w_down, b_down, w_up, b_up, adapter_index, scale, activation, skip, sample_scale,
                            check_values=False)
    name = resolve_backend(backend, x)
    ops = None if name == "torch" else _BACKENDS[name].bank
    if ops is None and name != "torch" and backend != "auto":
        raise ValueError(f"backend={name!r} has no adapter-bank kernels yet; use backend='triton' (CUDA tensors), "
                         "'cpu' (CPU tensors), 'torch' or 'auto'")
    refusal = None if ops is None else _BACKENDS[name].shape_refusal(shape.r)
    if refusal is not None and backend != "auto":
        raise ValueError(f"{refusal} (w_down {list(w_down.shape)})")
    if ops is None or shape.d == 0 or refusal is not None:
        return adapter_bank_reference(x, w_down, b_down, w_up, b_up, adapter_index, scale=scale,
                                      activation=activation, skip=skip, sample_scale=sample_scale)
    # The ids are checked before any kernel (the reference above checks them itself): here in one pass (one sync
    # on a GPU), except where the kernels' own grouping raises the same ValueError before computing anything (the
    # C++ bank kernels: no second pass over the ids), and under torch.compile (data-dependent; the kernels check).
    if name != "cpu" and not torch.compiler.is_compiling():
        check_bank_ids(adapter_index, shape.adapters)
    skip_is_x, x2, skip2 = _row_operands(x, skip, shape.d)
    if isinstance(scale, torch.Tensor):
        scale_t, scale_value = scale, 1.0
    else:
        scale_t, scale_value = None, float(scale)
    y = ops.fused(x2, w_down, b_down, w_up, b_up, scale_t, scale_value, skip2, skip_is_x, sample_scale,
                  shape.tokens_per_sample, activation, kernel_index(adapter_index))
    return y.view(x.shape)


def fused_linear_adapter(
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    scale: Scale = 1.0,
    activation: str = "gelu",
    residual: Optional[torch.Tensor] = None,
    residual_position: str = "before",
    layer_norm=None,
    backend: str = "auto",
) -> torch.Tensor:
    """A frozen Linear and a bottleneck adapter on its output in one kernel (docs/design.md, Linear + adapter):

        z = inp @ weight.T + bias
        "before":  t = z + residual;  y = t + s A(t)              (Adapter+ "post": after the block's residual)
        "after":   t = z;             y = residual + t + s A(t)   (intermediate / Pfeiffer / Houlsby)

    A(t) = act(t @ w_down.T + b_down) @ w_up.T + b_up; residual None: no residual term. The Linear's output
    never goes to memory in inference (only y does); with gradients t and h are written for the backward.

    Args:
        inp: ``[..., k]``; weight ``[d, k]``, bias ``[d]`` or None: the frozen ``nn.Linear(k, d)``. They may
            require grad: their gradients are computed (one more GEMM), never dropped.
        w_down, b_down, w_up, b_up, scale, activation: the adapter, as in fused_adapter.
        residual: None or a tensor shaped like the output ``[..., d]``.
        residual_position: "before" or "after" (above).
        layer_norm: None, or (weight, bias, eps) of a LayerNorm on t ("before" only): t = LN(z + residual), then
            y = t + s A(t) (BERT's output block with an Adapter+ post adapter). Fused for inference; when a
            gradient is needed "auto" runs the reference and a forced backend raises.
        backend: "auto" (Triton for CUDA tensors, the C++ kernel for fp32 / fp16 CPU tensors, else the
            reference: F.linear and the adapter unfused), "torch", "triton" or "cpu". The CUDA backend has no
            Linear + adapter kernel and says so when forced.

    Returns:
        y ``[..., d]`` in inp's dtype (the autocast dtype under torch.autocast). Gradients flow to inp, the
        adapter, scale, residual (and weight / bias when they require grad).
    """
    ln_params = tuple(layer_norm[:2]) if isinstance(layer_norm, (tuple, list)) and len(layer_norm) == 3 else ()
    inp, weight, bias, w_down, b_down, w_up, b_up, residual, *ln_params = _autocast_all(
        inp, weight, bias, w_down, b_down, w_up, b_up, residual, *ln_params)
    shape = check_linear_adapter_args(inp, weight, bias, w_down, b_down, w_up, b_up, scale, activation, residual,
                                      residual_position)
    ln = check_linear_layer_norm(layer_norm if not ln_params else (*ln_params, layer_norm[2]), inp, shape)
    save = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (inp, weight, bias, w_down, b_down, w_up, b_up, scale, residual) + ((ln[0], ln[1]) if ln else ()))
    name = resolve_backend(backend, inp)
    ops = None if name == "torch" else _BACKENDS[name].linear
    if ops is None and name != "torch" and backend != "auto":
        raise ValueError(f"backend={name!r} has no Linear + adapter kernel; use backend='triton' (CUDA tensors), "
                         "'cpu' (CPU tensors), 'torch' or 'auto'")
    refusal = None if ops is None else (_BACKENDS[name].shape_refusal(shape.adapter.r)
                                        or ops.refusal(shape.adapter.r, inp.dtype))
    if refusal is not None and backend != "auto":
        raise ValueError(f"{refusal} (w_down {list(w_down.shape)})")
    if ln is not None and save and ops is not None and backend != "auto":
        raise ValueError(f"backend={name!r}: fused_linear_adapter's layer_norm is fused for inference only (no "
                         "gradient); with gradients use backend='auto' or 'torch' (the reference)")
    if ops is None or refusal is not None or shape.adapter.d == 0 or shape.k == 0 or (ln is not None and save):
        return linear_adapter_reference(inp, weight, bias, w_down, b_down, w_up, b_up, scale=scale,
                                        activation=activation, residual=residual, residual_position=residual_position,
                                        layer_norm=ln)
    d = shape.adapter.d
    inp2 = as_rows(inp, shape.k)
    res2 = None if residual is None else as_rows(residual, d)
    scale_t, scale_value = _scale_operand(scale)
    ln_args = (None, None, -1.0) if ln is None else ln
    y = ops.fused(inp2, weight, bias, w_down, b_down, w_up, b_up, scale_t, scale_value, res2, shape.before,
                  activation, save, *ln_args)
    return y.view(shape.out_shape)
