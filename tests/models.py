"""Tiny models for the tests, built from local configs (no download): transformers ViT / BERT / LLaMA, a stand-in
for transformers 5's ViT layers (CI pins transformers 4 for AdapterHub) and one for timm's VisionTransformer (timm
does not import on the CPU machines)."""
from dataclasses import dataclass

import torch
from torch import nn


def hf_vit(hidden=32, layers=2, intermediate=64):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                 intermediate_size=intermediate, image_size=16, patch_size=8)
    return transformers.ViTModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def bert_config(hidden=32, layers=2, intermediate=64, vocab=50):
    import transformers

    return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                   intermediate_size=intermediate, vocab_size=vocab, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)


def hf_bert(hidden=32, layers=2, intermediate=64, vocab=50):
    import transformers

    cfg = bert_config(hidden, layers, intermediate, vocab)
    return transformers.BertModel(cfg).eval(), {"input_ids": torch.randint(0, vocab, (2, 6))}


def hf_llama(hidden=32, layers=2, intermediate=64, vocab=50):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=intermediate, vocab_size=vocab)
    return transformers.LlamaModel(cfg).eval(), {"input_ids": torch.randint(0, vocab, (2, 6))}


# ---- transformers 5's ViT layer (modeling_vit in 5.x: ViTLayer, ViTAttention with q/k/v/o_proj, ViTMLP with
# fc1 / activation_fn / fc2, one dropout after each branch), rebuilt with the same module names and the same forward
# so that add_adapters' transformers-5 layout and fuse_for_inference's _ViTMlpLayerThenAdapter are tested whichever
# transformers is installed.


class ViT5Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.head_dim = d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = scores.softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), weights


class ViT5MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.activation_fn = nn.GELU()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class ViTLayer(nn.Module):  # the class name add_adapters looks for
    def __init__(self, d, h, heads=2, dropout=0.0):
        super().__init__()
        self.attention = ViT5Attention(d, heads)
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = ViT5MLP(d, h)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return self.dropout(hidden_states) + residual


@dataclass
class _Output:
    last_hidden_state: torch.Tensor


class ViT5Standin(nn.Module):
    def __init__(self, d=32, h=64, depth=2, dropout=0.0):
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.layers = nn.ModuleList(ViTLayer(d, h, dropout=dropout) for _ in range(depth))
        self.layernorm = nn.LayerNorm(d)

    def forward(self, patches, attention_mask=None):
        x = self.embed(patches)
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask)
        return _Output(self.layernorm(x))


def vit5_standin(hidden=32, layers=2, intermediate=64):
    return ViT5Standin(hidden, intermediate, layers).eval(), {"patches": torch.randn(2, 5, 12)}


HF_MODELS = {"vit": hf_vit, "vit5": vit5_standin, "bert": hf_bert, "llama": hf_llama}


class Mlp(nn.Module):
    """timm.layers.Mlp's structure: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.drop1, self.norm = nn.Linear(d, h), nn.GELU(), nn.Dropout(0.0), nn.Identity()
        self.fc2, self.drop2 = nn.Linear(h, d), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _Attn(nn.Module):
    """timm's Attention structure at its end: proj, then proj_drop."""

    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj, self.proj_drop = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Dropout(0.0)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj_drop(self.proj(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v))


class Block(nn.Module):
    """timm.models.vision_transformer.Block's structure (layer scale and drop path as identities)."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = nn.LayerNorm(d), _Attn(d), nn.Identity(), nn.Identity()
        self.norm2, self.mlp, self.ls2, self.drop_path2 = nn.LayerNorm(d), Mlp(d, 2 * d), nn.Identity(), nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# adapterfuse recognises timm blocks by structure and by a module name under timm.; tests that pickle a
# model register this module as sys.modules["timm.models.vision_transformer"] for the duration
Block.__module__ = "timm.models.vision_transformer"


class TimmViT(nn.Module):
    def __init__(self, d=16, depth=2):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.blocks(x)[:, 0])


def timm_standin():
    return TimmViT().eval(), {"x": torch.randn(2, 5, 16)}
