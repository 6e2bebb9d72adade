"""The adapter inside the frozen Linear for inference (docs/design.md, Linear + adapter): AdaptedLinear, and
fuse_for_inference(model), which swaps every (Linear, adapter) pair that add_adapters created into one
fused_linear_adapter call, with unfuse_for_inference as the undo.

What is swapped, per integration (the adapter reads a Linear's output, possibly after a residual add):

    transformers (hooks, integrations/hf.py)
        intermediate / pfeiffer   the FFN output Linear's hook:  z -> z + s A(z)           ("after", no residual)
        houlsby                   the same for the attention output and the FFN output Linears
        post (ViT / DeiT)         ViTOutput: dense, dropout, + input_tensor, then the layer's hook:
                                  t = dense(h) + input_tensor -> t + s A(t)              ("before", residual)
                                  (transformers 5: the layer's forward, its MLP tail as one call: t =
                                  mlp.fc2(hidden) + x' -> t + s A(t))
        post (LLaMA family)       the decoder layer's forward, its tail as one call: t = down_proj(hidden) +
                                  residual -> t + s A(t)                                  ("before", residual)
        post (BERT family)        BertOutput: dense, dropout, LayerNorm(+ input_tensor), then the layer's hook:
                                  t = LN(dense(h) + input_tensor) -> t + s A(t)           ("before", residual,
                                  the LayerNorm inside the kernel: fused_linear_adapter's layer_norm)
    timm (block forwards, integrations/timm.py)
        post / pfeiffer           t = y + fc2(mlp hidden) -> t + s A(t)                   ("before", residual y)
        intermediate / houlsby    the FFN site: y + f + s A(f), f = fc2(hidden)             ("after", residual y)
        houlsby, attention site   attn.proj's forward: z -> z + s A_attn(z)               ("after", no residual;
                                  timm's Attention calls proj last, then proj_drop, so with proj_drop, ls1 and
                                  drop_path1 inactive the attention module's output is a + s A_attn(a))

Only in-place forward attributes and hooks change: the model's modules, parameters and state-dict keys stay as
they are (save / load / deep copy work on a fused model). A swapped site runs the unfused computation whenever
the fused one would differ: in training mode with an active dropout, drop-path, LayerScale or stochastic depth
in the way, for a merged adapter, or for an AdapterBank. pre and parallel positions have no Linear output to fuse
into (reported).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .functional import fused_linear_adapter
from .modules import Adapter

__all__ = ["AdaptedLinear", "fuse_for_inference", "unfuse_for_inference", "linear_adapter_forward"]


def _fusable_now(adapter: Adapter) -> bool:
    """Whether the fused op computes what the unfused pair would, now (drop-path and dropout off, no input
    LayerNorm inside the adapter, not merged)."""
    return isinstance(adapter, Adapter) and not adapter.merged and adapter.norm is None and \
        not (adapter.training and (adapter.drop_path > 0 or adapter.dropout > 0))


def _needs_grad(tensors, modules) -> bool:
    """Whether autograd will want a gradient through these tensors / module parameters now."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or \
        any(p.requires_grad for m in modules for p in m.parameters())


def linear_adapter_forward(linear: nn.Linear, adapter: Adapter, inp: torch.Tensor,
                           residual: Optional[torch.Tensor] = None, residual_position: str = "after",
                           layer_norm: Optional[nn.LayerNorm] = None) -> torch.Tensor:
    """linear then adapter on its output (with the residual before or after; layer_norm: t = LN(z + residual),
    "before"), fused where that is exact now (the LayerNorm variant: for inference, no gradient)."""
    fusable = _fusable_now(adapter) and (
        layer_norm is None or not _needs_grad((inp, residual), (linear, adapter, layer_norm)))
    if fusable:
        ln = None if layer_norm is None else (layer_norm.weight, layer_norm.bias, layer_norm.eps)
        return fused_linear_adapter(inp, linear.weight, linear.bias, adapter.down.weight, adapter.down.bias,
                                    adapter.up.weight, adapter.up.bias, scale=adapter.scale,
                                    activation=adapter.activation, residual=residual,
                                    residual_position=residual_position, layer_norm=ln, backend=adapter.backend)
    t = linear(inp)
    if residual is not None and residual_position == "before":
        t = t + residual
    if layer_norm is not None:
        t = layer_norm(t)
    y = adapter(t, skip=t)
    return y + residual if residual is not None and residual_position == "after" else y


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear and an Adapter on its output, as one fused_linear_adapter call.

    ``forward(inp, residual=None)``: ``residual_position="after"``: y = residual + z + s A(z) (z = linear(inp);
    the intermediate / Pfeiffer / Houlsby placement); ``"before"``: t = z + residual, y = t + s A(t) (Adapter+
    post). The Linear is frozen (its parameters' requires_grad set False); gradients reach inp, the residual and
    the adapter. In training with drop-path the pair runs unfused (the fused op has no per-sample scale)."""

    def __init__(self, linear: nn.Linear, adapter: Adapter, residual_position: str = "after"):
        super().__init__()
        if not isinstance(linear, nn.Linear) or not isinstance(adapter, Adapter):
            raise TypeError(f"AdaptedLinear takes an nn.Linear and an adapterfuse.Adapter, got "
                            f"{type(linear).__name__} and {type(adapter).__name__}")
        if adapter.dim != linear.out_features:
            raise ValueError(f"the adapter's dim {adapter.dim} is not the Linear's out_features "
                             f"{linear.out_features}")
        if residual_position not in ("before", "after"):
            raise ValueError(f"residual_position must be 'before' or 'after', got {residual_position!r}")
        self.linear, self.adapter, self.residual_position = linear, adapter, residual_position
        for p in linear.parameters():
            p.requires_grad_(False)

    def forward(self, inp: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_adapter_forward(self.linear, self.adapter, inp, residual, self.residual_position)

    def extra_repr(self) -> str:
        return f"residual_position={self.residual_position!r}"


# ------------------------------------------------------------------------------ the swapped forwards
# Module-level classes (not closures), set as instance attributes: deep copies map them to the copied modules
# and torch.save pickles them (as integrations/timm.py _BlockForward and adapters_hub._FusedForward do).


def _inactive(m: nn.Module) -> bool:
    """Identity-like now: an nn.Identity, a dropout in eval mode or with p = 0, None."""
    if m is None or isinstance(m, nn.Identity):
        return True
    return isinstance(m, nn.modules.dropout._DropoutNd) and (m.p == 0 or not m.training)


class _LinearThenAdapter:
    """A Linear's forward that also applies the adapter its hook applied: z -> z + s A(z)."""

    def __init__(self, linear: nn.Linear, adapter: Adapter):
        self.linear, self.adapter = linear, adapter

    def __call__(self, inp):
        return linear_adapter_forward(self.linear, self.adapter, inp, None, "after")


class _ViTOutputThenAdapter:
    """ViTOutput's forward (dense, dropout, + input_tensor) with the layer's post adapter after it."""

    def __init__(self, output: nn.Module, adapter: Adapter):
        self.output, self.adapter = output, adapter

    def __call__(self, hidden_states, input_tensor):
        out = self.output
        if _inactive(out.dropout):
            return linear_adapter_forward(out.dense, self.adapter, hidden_states, input_tensor, "before")
        t = type(out).forward(out, hidden_states, input_tensor)
        return self.adapter(t, skip=t)


class _BertOutputThenAdapter:
    """BertOutput's forward (dense, dropout, LayerNorm of the sum with input_tensor) with the layer's post adapter
    after it, the LayerNorm inside the kernel."""

    def __init__(self, output: nn.Module, adapter: Adapter):
        self.output, self.adapter = output, adapter

    def __call__(self, hidden_states, input_tensor):
        out = self.output
        if _inactive(out.dropout):
            return linear_adapter_forward(out.dense, self.adapter, hidden_states, input_tensor, "before",
                                          layer_norm=out.LayerNorm)
        t = type(out).forward(out, hidden_states, input_tensor)
        return self.adapter(t, skip=t)


def _bert_output_like(output) -> bool:
    """BertOutput's structure (RoBERTa, ELECTRA, ... share it): dense, dropout, LayerNorm over the last dim."""
    ln = getattr(output, "LayerNorm", None)
    return isinstance(getattr(output, "dense", None), nn.Linear) and hasattr(output, "dropout") and \
        isinstance(ln, nn.LayerNorm) and tuple(ln.normalized_shape) == (output.dense.out_features,)


def _llama_like(layer) -> bool:
    """A LLaMA-family decoder layer of the structure _LlamaLayerThenAdapter reimplements."""
    mlp = getattr(layer, "mlp", None)
    return all(hasattr(layer, a) for a in ("input_layernorm", "self_attn", "post_attention_layernorm")) and \
        all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "act_fn")) and \
        isinstance(getattr(mlp, "down_proj", None), nn.Linear)


class _LlamaLayerThenAdapter:
    """A LLaMA-family decoder layer's forward (transformers 4.5x: input norm, attention, residual, post-attention
    norm, gated MLP, residual) with the layer's post adapter inside down_proj's kernel: t = down_proj(hidden) +
    residual, y = t + s A(t) ("before"). The attention call takes the layer's own keyword arguments."""

    def __init__(self, layer: nn.Module, adapter: Adapter):
        self.layer, self.adapter = layer, adapter

    def __call__(self, hidden_states, *args, **kwargs):
        layer = self.layer
        if args:  # positional attention arguments: keep the class's own forward (then the adapter)
            out = type(layer).forward(layer, hidden_states, *args, **kwargs)
            return self.adapter(out, skip=out)
        if "past_key_value" in kwargs:  # (the name transformers deprecates for past_key_values)
            kwargs["past_key_values"] = kwargs.pop("past_key_value")
        residual = hidden_states
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + attn
        h = layer.post_attention_layernorm(hidden_states)
        mlp = layer.mlp
        return linear_adapter_forward(mlp.down_proj, self.adapter, mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h),
                                      hidden_states, "before")


def _vit_mlp_like(layer) -> bool:
    """A transformers 5 ViT / DeiT layer of the structure _ViTMlpLayerThenAdapter reimplements (pre-norm
    attention and MLP, one dropout after each, mlp = fc1, activation_fn, fc2)."""
    mlp = getattr(layer, "mlp", None)
    return all(isinstance(getattr(layer, a, None), nn.LayerNorm) for a in ("layernorm_before", "layernorm_after")) \
        and hasattr(layer, "attention") and isinstance(getattr(layer, "dropout", None), nn.Dropout) and \
        isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear) and \
        hasattr(mlp, "activation_fn")


class _ViTMlpLayerThenAdapter:
    """A transformers 5 ViT / DeiT layer's forward (x' = x + drop(attention(LN_before(x))), then
    x' + drop(fc2(act(fc1(LN_after(x')))))) with the layer's post adapter inside fc2's kernel: t = fc2(hidden) +
    x', y = t + s A(t) ("before"), while the dropout is inactive; the class's own forward then the adapter
    otherwise."""

    def __init__(self, layer: nn.Module, adapter: Adapter):
        self.layer, self.adapter = layer, adapter

    def __call__(self, hidden_states, *args, **kwargs):
        layer = self.layer
        if not _inactive(layer.dropout):
            out = type(layer).forward(layer, hidden_states, *args, **kwargs)
            return self.adapter(out, skip=out)
        attn, _ = layer.attention(layer.layernorm_before(hidden_states), *args, **kwargs)
        hidden_states = attn + hidden_states
        mlp = layer.mlp
        hidden = mlp.activation_fn(mlp.fc1(layer.layernorm_after(hidden_states)))
        return linear_adapter_forward(mlp.fc2, self.adapter, hidden, hidden_states, "before")


def _mlp_hidden(mlp, x):
    """timm Mlp up to fc2's input: fc1, act, drop1, norm."""
    return mlp.norm(mlp.drop1(mlp.act(mlp.fc1(x))))


def _timm_plain_mlp(block) -> bool:
    """timm's plain Mlp (fc1, act, drop1, norm, fc2, drop2 in that order), not a gated variant."""
    mlp = block.mlp
    return type(mlp).__name__ == "Mlp" and all(hasattr(mlp, a) for a in ("fc1", "act", "drop1", "norm", "drop2")) \
        and isinstance(getattr(mlp, "fc2", None), nn.Linear)


def _timm_ffn_fusable(block) -> bool:
    """Exact now: nothing between fc2 and the residual add (drop2, ls2, drop_path2 inactive)."""
    return _inactive(block.mlp.drop2) and isinstance(block.ls2, nn.Identity) and _inactive_path(block.drop_path2)


def _inactive_path(m) -> bool:
    """timm DropPath / stochastic depth: Identity, p = 0 or eval."""
    return isinstance(m, nn.Identity) or not m.training or getattr(m, "drop_prob", 0.0) == 0.0


def _timm_attention_proj(block) -> bool:
    """timm's Attention structure: the output Linear ``proj`` (called last in its forward) and ``proj_drop``."""
    attn = block.attn
    return isinstance(getattr(attn, "proj", None), nn.Linear) and hasattr(attn, "proj_drop") and \
        attn.proj.out_features == block.adapter_attn.dim


def _timm_attn_fusable(block) -> bool:
    """Exact now for houlsby's attention site: nothing between attn.proj and the adapter (proj_drop, ls1,
    drop_path1 inactive) and the adapter itself fusable now."""
    return _inactive(block.attn.proj_drop) and isinstance(block.ls1, nn.Identity) and \
        _inactive_path(block.drop_path1) and _fusable_now(block.adapter_attn)


class _TimmAttnProj:
    """attn.proj's forward in a houlsby block whose attention site is fused: z -> z + s A_attn(z) while that is
    exact (_timm_attn_fusable), else the plain Linear. The block's forward (_TimmFusedBlock) asks the same
    predicate, so adapter_attn runs exactly once: inside proj's kernel, or after the attention branch."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, inp):
        b = self.block
        proj = b.attn.proj
        if _timm_attn_fusable(b):
            return linear_adapter_forward(proj, b.adapter_attn, inp, None, "after")
        return type(proj).forward(proj, inp)


class _TimmFusedBlock:
    """A timm block's forward with its FFN-site adapter inside fc2 (post / pfeiffer: "before", residual y;
    intermediate / houlsby: "after", residual y) and, for houlsby with ``attn`` set, the attention-site adapter
    inside attn.proj (_TimmAttnProj). Each site runs unfused whenever the fused form is not exact now."""

    def __init__(self, block: nn.Module, position: str, original, ffn: bool = True, attn: bool = False):
        self.block, self.position, self.original = block, position, original
        self.ffn, self.attn = ffn, attn

    def __call__(self, x):
        from .integrations.timm import _attn_branch, _mlp_branch

        b = self.block
        ffn = self.ffn and _timm_ffn_fusable(b) and _fusable_now(b.adapter)
        if self.position != "houlsby":
            if not ffn:
                return self.original(x)
            y = x + _attn_branch(b, x)
        elif self.attn and _timm_attn_fusable(b):
            y = x + b.attn(b.norm1(x))  # adapter_attn inside attn.proj; ls1 / drop_path1 are identities now
        else:
            a = _attn_branch(b, x)
            y = x + b.adapter_attn(a, skip=a)
        if not ffn:  # houlsby's FFN site unfused, as integrations.timm._houlsby
            f = _mlp_branch(b, y)
            return y + b.adapter(f, skip=f)
        hidden = _mlp_hidden(b.mlp, b.norm2(y))
        where = "before" if self.position in ("post", "pfeiffer") else "after"
        return linear_adapter_forward(b.mlp.fc2, b.adapter, hidden, y, where)


def _why_not(adapter: nn.Module) -> Optional[str]:
    """Why an adapter module cannot go into a Linear's kernel at all (None: it can)."""
    if not isinstance(adapter, Adapter):
        return "not fused: an AdapterBank (several adapters per site)"
    if adapter.norm is not None:
        return "not fused: the adapter has its own input LayerNorm (fused_linear_adapter has no such variant)"
    return None


def _remove_hook(module: nn.Module, adapter: nn.Module) -> bool:
    """Remove add_adapters' _SequentialHook of `adapter` from `module`; whether one was there."""
    from .integrations import hf

    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, hf._SequentialHook) and hook.adapter is adapter:
            del module._forward_hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(key, None)
            return True
    return False


def fuse_for_inference(model: nn.Module) -> Dict[str, str]:
    """Swap every (Linear, adapter) pair that add_adapters created into one fused_linear_adapter call; returns
    {adapter name: what was done / why not}, in the style of adapterfuse.merge. Exact: the outputs are those of
    the unfused model (in training mode with active dropout / drop-path the swapped sites run unfused).
    unfuse_for_inference(model) undoes it."""
    from .integrations import hf
    from .integrations import timm as timm_int

    report: Dict[str, str] = {}
    blocks = timm_int.find_blocks(model)
    for name, block in blocks:
        fwd = block.__dict__.get("forward")
        if not isinstance(fwd, timm_int._BlockForward):
            continue
        prefix = f"{name}." if name else ""
        pos = fwd.position
        if pos not in ("post", "pfeiffer", "intermediate", "houlsby"):
            report[prefix + "adapter"] = f"not fused: the {pos} position reads no Linear's output"
            continue
        why = _why_not(block.adapter) or (None if _timm_plain_mlp(block) else
                                          "not fused: the block's MLP is not timm's plain Mlp")
        report[prefix + "adapter"] = why or \
            f"fused into mlp.fc2 ({'before' if pos in ('post', 'pfeiffer') else 'after'})"
        attn = False
        if pos == "houlsby":
            why_attn = _why_not(block.adapter_attn) or (None if _timm_attention_proj(block) else
                                                        "not fused: the block's attention has no timm-style "
                                                        "proj (nn.Linear) / proj_drop")
            attn = why_attn is None
            report[prefix + "adapter_attn"] = why_attn or f"fused into {prefix}attn.proj (after)"
        if why and not attn:
            continue
        if attn:
            block.attn.proj.forward = _TimmAttnProj(block)
        block.forward = _TimmFusedBlock(block, pos, fwd, ffn=why is None, attn=attn)
    if blocks:
        return report
    family, arch, layers = hf._find_layers(model)
    for name, layer in layers:
        prefix = f"{name}." if name else ""
        lay = arch.layout(layer)
        for site, linear_path in (("ffn", lay.ffn_out), ("attn", lay.attn_out)):
            adapter = getattr(layer, f"adapterfuse_{site}", None)
            if adapter is None:
                continue
            why = _why_not(adapter)
            if why:
                report[prefix + f"adapterfuse_{site}"] = why
                continue
            linear = layer.get_submodule(linear_path)
            if _remove_hook(linear, adapter):
                linear.forward = _LinearThenAdapter(linear, adapter)
                report[prefix + f"adapterfuse_{site}"] = f"fused into {prefix}{linear_path} (after)"
        post = getattr(layer, "adapterfuse_post", None)
        if post is not None:
            key = prefix + "adapterfuse_post"
            output = getattr(layer, "output", None)
            why = _why_not(post)
            if why:
                report[key] = why
            elif family == "vit" and type(output).__name__ in ("ViTOutput", "DeiTOutput"):
                if _remove_hook(layer, post):
                    output.forward = _ViTOutputThenAdapter(output, post)
                    report[key] = f"fused into {prefix}output.dense (before)"
            elif family == "vit" and _vit_mlp_like(layer):
                if _remove_hook(layer, post):
                    layer.forward = _ViTMlpLayerThenAdapter(layer, post)
                    report[key] = f"fused into {prefix}mlp.fc2 (before)"
            elif family == "llama" and _llama_like(layer):
                if _remove_hook(layer, post):
                    layer.forward = _LlamaLayerThenAdapter(layer, post)
                    report[key] = f"fused into {prefix}mlp.down_proj (before)"
            elif family == "bert" and _bert_output_like(output):
                if _remove_hook(layer, post):
                    output.forward = _BertOutputThenAdapter(output, post)
                    report[key] = f"fused into {prefix}output.dense (before, with its LayerNorm)"
            else:
                report[key] = "not fused: the layer's structure is not one fuse_for_inference knows"
        for site in ("pre", "parallel"):
            if getattr(layer, f"adapterfuse_{site}", None) is not None:
                report[prefix + f"adapterfuse_{site}"] = f"not fused: the {site} position reads no Linear's output"
    return report


def unfuse_for_inference(model: nn.Module) -> int:
    """Undo fuse_for_inference: the add_adapters hooks and block forwards come back; returns how many sites."""
    from .integrations import hf

    n = 0
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, _LinearThenAdapter):
            del module.forward
            hf._HANDLES.setdefault(model, []).append(module.register_forward_hook(hf._SequentialHook(fwd.adapter)))
            n += 1
        elif isinstance(fwd, (_ViTOutputThenAdapter, _BertOutputThenAdapter)):
            del module.forward
            layer = next(m for m in model.modules() if getattr(m, "output", None) is module)
            hf._HANDLES.setdefault(model, []).append(layer.register_forward_hook(hf._SequentialHook(fwd.adapter)))
            n += 1
        elif isinstance(fwd, (_LlamaLayerThenAdapter, _ViTMlpLayerThenAdapter)):
            del module.forward
            hf._HANDLES.setdefault(model, []).append(module.register_forward_hook(hf._SequentialHook(fwd.adapter)))
            n += 1
        elif isinstance(fwd, _TimmFusedBlock):
            module.forward = fwd.original
            n += fwd.ffn
        elif isinstance(fwd, _TimmAttnProj):
            del module.forward
            n += 1
    return n

