"""The timm integration, tested without timm (it does not import on the CPU machines): a module with the
structure of timm's vision_transformer.Block stands in for it. Each position must compute the Adapter+
paper's block (written out below), and adapter-plus checkpoints must load key for key."""
import pytest
import torch
from torch import nn

import adapterfuse as af
from adapterfuse.integrations import timm as af_timm
from helpers import cpu_backends, rel_err, zero_adapter_outputs
from models import TimmViT


ViT = TimmViT


def _branch(a, t):  # s * up(act(down(t))) with the module's own weights, drop-path off
    return a(t)


def expected_block(block, x, position):
    """The Adapter+ reference code's block forward, written out."""
    at = lambda t: block.attn(block.norm1(t))  # noqa: E731
    ml = lambda t: block.mlp(block.norm2(t))  # noqa: E731
    A = lambda t: _branch(block.adapter, t)  # noqa: E731
    if position == "post":
        y = x + at(x)
        z = y + ml(y)
        return z + A(z)
    if position == "pre":
        y = x + at(x)
        y = y + A(y)
        return y + ml(y)
    if position == "pfeiffer":
        y = x + at(x)
        f = ml(y)
        return y + f + A(y + f)
    if position == "intermediate":
        y = x + at(x)
        f = ml(y)
        return y + f + A(f)
    if position == "houlsby":
        a = at(x)
        y = x + a + _branch(block.adapter_attn, a)
        f = ml(y)
        return y + f + A(f)
    y = x + at(x)
    return y + ml(y) + A(y)


@pytest.mark.parametrize("position", ["post", "pre", "pfeiffer", "intermediate", "houlsby", "parallel"])
def test_positions_follow_the_paper(position):
    torch.manual_seed(0)
    model = ViT().eval()
    x = torch.randn(2, 5, 16)
    before = model(x)
    names = af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position=position),
                            backend="torch")
    assert names[0] == "blocks.0.adapter" and len(names) == (4 if position == "houlsby" else 2)
    assert all(not a.training for a in zero_adapter_outputs(model))  # the model was in eval mode
    assert torch.allclose(model(x), before, atol=1e-6)
    for m in model.modules():
        if isinstance(m, af.Adapter):
            nn.init.normal_(m.up.weight, std=0.3)
            nn.init.normal_(m.scale, mean=1.0, std=0.2)
    block = model.blocks[0]
    assert torch.allclose(block(x), expected_block(block, x, position), atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_block_matches_reference(backend):
    torch.manual_seed(0)
    model = ViT().eval()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4), backend=backend)
    for m in model.modules():
        if isinstance(m, af.Adapter):
            nn.init.normal_(m.up.weight, std=0.3)
    x = torch.randn(2, 5, 16)
    y = model(x)
    for m in model.modules():
        if isinstance(m, af.Adapter):
            m.backend = "torch"
    assert rel_err(y, model(x)) < 1e-5


def test_freeze_leaves_adapters_and_head():
    model = ViT()
    af_timm.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4))
    trainable = {n.split(".")[0] if n.startswith("head") else n.split(".")[2] for n, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"head", "adapter"}


def test_adapter_plus_checkpoint_loads_key_for_key():
    torch.manual_seed(0)
    model = ViT().eval()
    af_timm.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4), freeze=False)
    ckpt = {}
    for k, v in model.state_dict().items():  # rename ours into adapter-plus's layout, with new values
        k = (k.replace("adapter.down.", "adapter.bottleneck.1.").replace("adapter.up.", "adapter.bottleneck.4.")
             .replace("adapter.scale", "adapter.scaling"))
        ckpt[k] = torch.randn_like(v)
    report = af_timm.load_adapter_plus_state_dict(model, ckpt)
    assert report == {"missing": [], "unexpected": []}
    sd = model.state_dict()
    assert torch.equal(sd["blocks.1.adapter.down.weight"], ckpt["blocks.1.adapter.bottleneck.1.weight"])
    assert torch.equal(sd["blocks.0.adapter.up.bias"], ckpt["blocks.0.adapter.bottleneck.4.bias"])
    assert torch.equal(sd["blocks.0.adapter.scale"], ckpt["blocks.0.adapter.scaling"])
    assert torch.equal(sd["head.weight"], ckpt["head.weight"])


def test_checkpoint_with_adapter_norm_is_refused():
    model = ViT()
    af_timm.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4))
    with pytest.raises(ValueError, match="LayerNorm"):
        af_timm.load_adapter_plus_state_dict(model, {"blocks.0.adapter.norm_a.weight": torch.ones(16)})


def test_key_map():
    m = af_timm.adapter_plus_key_map
    assert m("blocks.3.adapter_attn.bottleneck.4.weight") == "blocks.3.adapter_attn.up.weight"
    assert m("blocks.3.adapter.scaling") == "blocks.3.adapter.scale"
    assert m("blocks.3.attn.qkv.weight") == "blocks.3.attn.qkv.weight"


def test_not_a_timm_model():
    with pytest.raises(ValueError):
        af_timm.add_adapters(nn.Sequential(nn.Linear(2, 2)), af.AdapterConfig())


@pytest.mark.parametrize("position", ["post", "pre", "pfeiffer", "intermediate", "houlsby", "parallel"])
def test_real_timm_vit(position):
    """timm itself (installed on the GPU machines; it does not import on the CPU ones)."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    names = af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position=position), backend="torch")
    assert names[0] == "blocks.0.adapter"
    zero_adapter_outputs(model)
    assert torch.allclose(model(x), before, atol=1e-5)
    for m in model.modules():
        if isinstance(m, af.Adapter):
            nn.init.normal_(m.up.weight, std=0.3)
    block = model.blocks[0]
    tokens = torch.randn(2, 17, 32)
    assert torch.allclose(block(tokens), expected_block(block, tokens, position), atol=1e-5)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"blocks", "head"}
