"""Adapter / AdapterConfig: presets, init statistics, scaling kinds, drop-path behaviour."""
import math

import pytest
import torch
from torch import nn

import adapterfuse
import adapterfuse as af
from adapterfuse import Adapter, AdapterConfig
from adapterfuse.reference import adapter_reference
from helpers import device_for, fused_backends, randomize_adapters, rel_err


def test_adapter_plus_preset():
    c = AdapterConfig.adapter_plus(bottleneck=8)
    assert (c.bottleneck, c.activation, c.scaling, c.bias, c.init, c.drop_path, c.position) == \
           (8, "gelu", "channel", True, "houlsby", 0.1, "post")
    m = Adapter.from_config(768, c)
    assert isinstance(m.down, nn.Linear) and isinstance(m.up, nn.Linear)
    assert m.down.weight.shape == (8, 768) and m.up.weight.shape == (768, 8)
    assert isinstance(m.scale, nn.Parameter) and m.scale.shape == (768,)
    assert m.drop_path == 0.1 and m.activation == "gelu"
    assert not any(isinstance(mod, nn.LayerNorm) for mod in m.modules())  # no norm in Adapter+


@pytest.mark.parametrize("preset,expect", [
    ("houlsby", dict(position="houlsby", activation="silu", scaling=1.0, init="houlsby")),
    ("pfeiffer", dict(position="pfeiffer", activation="relu", scaling=1.0, init="bert")),
    ("parallel", dict(position="parallel", activation="relu", scaling=4.0, init="lora")),
])
def test_other_presets(preset, expect):
    c = getattr(AdapterConfig, preset)(bottleneck=16)
    assert c.bottleneck == 16
    for k, v in expect.items():
        assert getattr(c, k) == v, k
    m = Adapter.from_config(64, c)
    assert m.scale == expect["scaling"]
    assert AdapterConfig.pfeiffer(bottleneck=4, activation="gelu").activation == "gelu"  # presets take overrides


def test_scaling_kinds():
    assert Adapter(32, 4, scaling=0.5).scale == 0.5
    learned = Adapter(32, 4, scaling="learned").scale
    assert isinstance(learned, nn.Parameter) and learned.shape == (1,) and learned.item() == 1.0
    channel = Adapter(32, 4, scaling="channel").scale
    assert channel.shape == (32,) and torch.all(channel == 1)
    with pytest.raises(ValueError):
        Adapter(32, 4, scaling="per-token")
    with pytest.raises(ValueError):
        AdapterConfig(position="everywhere")
    with pytest.raises(ValueError):
        Adapter(32, 0)
    with pytest.raises(ValueError):
        Adapter(32, 4, drop_path=1.0)


def test_houlsby_init_statistics():
    torch.manual_seed(0)
    m = Adapter(1024, 64, init="houlsby")
    for w in (m.down.weight, m.up.weight):
        assert w.abs().max() <= 0.02 + 1e-7  # cut at +-2 std
        # std of N(0, 0.01^2) truncated at +-2 std is 0.01 * 0.8796
        assert abs(w.std().item() - 0.008796) < 3e-4
        assert abs(w.mean().item()) < 3e-4
    assert torch.all(m.down.bias == 0) and torch.all(m.up.bias == 0)


def test_lora_init_statistics():
    torch.manual_seed(0)
    m = Adapter(768, 32, init="lora")
    assert torch.all(m.up.weight == 0) and torch.all(m.up.bias == 0) and torch.all(m.down.bias == 0)
    bound = 1 / math.sqrt(768)  # kaiming_uniform(a=sqrt(5)) on fan_in 768
    w = m.down.weight
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 2e-3


def test_bert_init_statistics():
    torch.manual_seed(0)
    m = Adapter(1024, 64, init="bert")
    for w in (m.down.weight, m.up.weight):
        assert abs(w.std().item() - 0.02) < 5e-4 and w.abs().max() > 0.06  # not truncated


def test_drop_path_is_off_in_eval_and_per_sample_in_training():
    torch.manual_seed(0)
    m = Adapter(16, 4, drop_path=0.5, scaling="channel", backend="torch")
    randomize_adapters(m, std=0.2)
    x = torch.randn(64, 3, 16)
    branch = adapter_reference(x, m.down.weight, m.down.bias, m.up.weight, m.up.bias, scale=m.scale)
    m.eval()
    assert torch.allclose(m(x, skip=x), x + branch)
    m.train()
    y = m(x, skip=x)
    factor = ((y - x) * branch).sum((1, 2)) / (branch * branch).sum((1, 2))  # per-sample factor on the branch
    assert torch.allclose(factor, torch.round(factor), atol=1e-4)  # exactly 0 or 1/(1-p) = 2 per sample
    assert set(torch.round(factor).tolist()) == {0.0, 2.0}
    assert torch.allclose(y - x, branch * factor[:, None, None], atol=1e-5)
    kept = (factor > 1).float().mean().item()
    assert 0.25 < kept < 0.75


def test_forward_skip_semantics():
    m = Adapter(8, 2, init="bert", backend="torch")
    x, other = torch.randn(3, 8), torch.randn(3, 8)
    branch = m(x)
    assert torch.allclose(m(x, skip=x), x + branch) and torch.allclose(m(x, skip=other), other + branch)


@pytest.mark.parametrize("backend", fused_backends())
def test_module_backends_agree(backend):
    torch.manual_seed(0)
    dev = device_for(backend)
    m = Adapter.from_config(48, AdapterConfig.adapter_plus(bottleneck=6), backend=backend).to(dev).eval()
    randomize_adapters(m, std=0.2)
    x = torch.randn(2, 9, 48, device=dev, requires_grad=True)
    y = m(x, skip=x)
    y.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    m.backend = "torch"
    y_ref = m(x, skip=x)
    y_ref.sum().backward()
    ref_grads = [p.grad for p in m.parameters()] + [x.grad]
    assert rel_err(y, y_ref) < 1e-5
    for g, gr in zip(grads, ref_grads):
        assert rel_err(g, gr) < 1e-5


def test_autocast_runs_in_low_precision():
    m = Adapter(16, 4, init="bert", scaling="channel")
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, skip=x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, m(x, skip=x)) < 1e-2


# ---------------------------------------------------- the input LayerNorm and dropout options (issue 12)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ("cpu", "triton") if b in af.available_backends()])
def test_adapter_layer_norm_and_dropout_options(backend):
    """Adapter(layer_norm=True, dropout=p): eval = the reference with the LayerNorm (no dropout); training = the
    reference given the fused op's mask (its seed drawn as fused_adapter draws it); gradients reach the LayerNorm."""
    from adapterfuse.functional import _seed_tensor
    from adapterfuse.reference import adapter_reference, dropout_keep
    from helpers import device_for

    dev = device_for(backend) if backend != "torch" else "cpu"
    torch.manual_seed(0)
    a = af.Adapter(24, 4, scaling="channel", init="bert", layer_norm=True, dropout=0.3, backend=backend).to(dev)
    with torch.no_grad():
        a.norm.weight.add_(torch.randn(24, device=dev) * 0.2)
        a.norm.bias.add_(torch.randn(24, device=dev) * 0.2)
        a.up.weight.normal_(0, 0.3)
    assert set(a.state_dict()) >= {"norm.weight", "norm.bias"}
    x = (torch.randn(3, 5, 24, device=dev) * 2 + 3).requires_grad_()
    ln = (a.norm.weight, a.norm.bias, a.norm.eps)
    ref = lambda mask=None: adapter_reference(x, a.down.weight, a.down.bias, a.up.weight, a.up.bias,  # noqa: E731
                                              scale=a.scale, skip=x, layer_norm=ln, dropout_mask=mask)
    a.eval()
    torch.testing.assert_close(a(x, skip=x), ref(), rtol=1e-5, atol=1e-5)
    a.train()
    torch.manual_seed(7)
    y = a(x, skip=x)
    torch.manual_seed(7)
    keep = dropout_keep(_seed_tensor(None), 15, 24, 0.3, dev).reshape(3, 5, 24)
    y_ref = ref(keep.float() / 0.7)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum(), [x, a.norm.weight, a.norm.bias])
    g_ref = torch.autograd.grad(y_ref.sum(), [x, a.norm.weight, a.norm.bias])
    for u, v in zip(g, g_ref):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_layer_norm_and_dropout_options_where_they_cannot_go():
    cfg = af.AdapterConfig.pfeiffer(bottleneck=4, layer_norm=True, dropout=0.1)
    a = af.Adapter.from_config(16, cfg)
    assert a.norm is not None and a.dropout == 0.1
    with pytest.raises(ValueError, match="dropout must be a probability"):
        af.AdapterConfig(dropout=1.5)
    with pytest.raises(ValueError, match="AdapterBank has no input LayerNorm or dropout"):
        af.AdapterBank.from_config(16, cfg, ["a", "b"])
    bank = af.AdapterBank(16, 4, 2)
    with pytest.raises(ValueError, match="does not fit an AdapterBank"):
        bank.set_adapter(0, a)
    from adapterfuse.merge import merge_into_linear

    lin = torch.nn.Linear(16, 16)
    b = af.Adapter(16, 4, activation="identity", layer_norm=True).eval()
    with pytest.raises(ValueError, match="input LayerNorm is not affine"):
        merge_into_linear(b, lin)
