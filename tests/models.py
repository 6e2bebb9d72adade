"""Tiny models for the tests, built from local configs (no download): transformers ViT / BERT / LLaMA and a
stand-in for timm's VisionTransformer (timm does not import on the CPU machines)."""
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


HF_MODELS = {"vit": hf_vit, "bert": hf_bert, "llama": hf_llama}


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
