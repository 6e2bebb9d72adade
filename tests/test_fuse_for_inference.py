"""AdaptedLinear and fuse_for_inference (the adapter inside the frozen Linear, docs/design.md, Linear +
adapter): every (Linear, adapter) pair add_adapters made is swapped into one fused_linear_adapter call with the
unfused model's outputs, what cannot be swapped is reported with the reason, and unfuse_for_inference gives the
original model back."""
import copy

import pytest
import torch

import adapterfuse as af
import models
from helpers import randomize_adapters

transformers = pytest.importorskip("transformers")

# position -> the sites fuse_for_inference swaps, per family ("post": the output Linear plus the residual, and
# for BERT its LayerNorm, inside the kernel)
EXPECTED = {"post": {"vit": 1, "vit5": 1, "bert": 1, "llama": 1}, "intermediate": 1, "pfeiffer": 1, "houlsby": 2,
            "pre": 0,
            "parallel": 0}


def _count_calls(monkeypatch):
    from adapterfuse import inference

    calls = []
    orig = inference.fused_linear_adapter
    monkeypatch.setattr(inference, "fused_linear_adapter", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def _run(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _seeded_pair(model, twin, inputs, calls):
    """The fused model's and its unfused twin's outputs under the same seed (training-mode randomness alike),
    checked equal, with no fused call made."""
    torch.manual_seed(7)
    y0 = _run(twin, inputs)
    torch.manual_seed(7)
    y1 = _run(model, inputs)
    assert not calls
    torch.testing.assert_close(y1, y0)
    return y1


@pytest.mark.parametrize("family", ["vit", "vit5", "bert", "llama"])
@pytest.mark.parametrize("position", list(EXPECTED))
def test_hf_models_fuse_with_identical_outputs(family, position, monkeypatch):
    torch.manual_seed(0)
    model, inputs = models.HF_MODELS[family]()
    model.eval()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position=position, drop_path=0.0))
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        y0 = _run(model, inputs)
    report = af.fuse_for_inference(model)
    per_layer = EXPECTED[position] if isinstance(EXPECTED[position], int) else EXPECTED[position][family]
    fused = [k for k, v in report.items() if v.startswith("fused")]
    assert len(fused) == 2 * per_layer, report  # two layers
    assert all(v.startswith(("fused", "not fused")) for v in report.values())
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        y1 = _run(model, inputs)
    assert len(calls) == 2 * per_layer
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(_run(twin, inputs), y0, rtol=1e-5, atol=1e-5)
    assert af.unfuse_for_inference(model) == 2 * per_layer
    calls.clear()
    with torch.no_grad():
        assert torch.equal(_run(model, inputs), y0)
    assert not calls
    af.remove_adapters(model)  # the restored hooks are add_adapters' own again
    assert not af.integrations.hf.adapter_modules(model)


@pytest.mark.parametrize("position", ["post", "pfeiffer", "intermediate", "houlsby", "pre"])
def test_timm_blocks_fuse_with_identical_outputs(position, monkeypatch):
    torch.manual_seed(0)
    model, inputs = models.timm_standin()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position=position, drop_path=0.0))
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        y0 = model(**inputs)
    report = af.fuse_for_inference(model)
    n = {"pre": 0, "houlsby": 4}.get(position, 2)  # houlsby: the FFN site and the attention site (attn.proj)
    assert sum(v.startswith("fused") for v in report.values()) == n, report
    if position == "houlsby":
        assert all(v.endswith("attn.proj (after)") for k, v in report.items() if k.endswith("adapter_attn"))
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), y0, rtol=1e-5, atol=1e-5)
    assert len(calls) == n
    assert af.unfuse_for_inference(model) == n
    with torch.no_grad():
        assert torch.equal(model(**inputs), y0)


def test_training_mode_with_drop_path_runs_unfused_and_exact(monkeypatch):
    """A swapped site in training mode with drop-path active computes what the unfused model computes (same
    seed), through the unfused pair; gradients reach the adapters."""
    torch.manual_seed(0)
    model, inputs = models.HF_MODELS["vit"]()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position="post", drop_path=0.5))
    randomize_adapters(model, seed=3)
    model.train()
    twin = copy.deepcopy(model)
    af.fuse_for_inference(model)
    y1 = _seeded_pair(model, twin, inputs, _count_calls(monkeypatch))
    y1.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "adapterfuse" in n)


@pytest.mark.parametrize("position", ["before", "after"])
def test_adapted_linear_equals_linear_then_adapter(position):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20)
    adapter = af.Adapter(20, 4, scaling="channel", init="bert")
    randomize_adapters(adapter, seed=4)
    mod = af.AdaptedLinear(linear, adapter, residual_position=position)
    assert not any(p.requires_grad for p in linear.parameters())
    x = torch.randn(3, 5, 12, requires_grad=True)
    res = torch.randn(3, 5, 20, requires_grad=True)
    y = mod(x, res)
    t = linear(x) + (res if position == "before" else 0)
    ref = adapter(t, skip=t) + (res if position == "after" else 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(y.square().sum(), [x, res, adapter.down.weight, adapter.scale])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, res, adapter.down.weight, adapter.scale])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="out_features"):
        af.AdaptedLinear(torch.nn.Linear(12, 8), adapter)


def test_bert_post_with_gradients_runs_unfused_and_exact():
    """BERT's post site (the LayerNorm inside the kernel) is fused for inference; with gradients it runs the
    unfused pair (the LayerNorm variant has no fused backward), with the unfused model's outputs and gradients."""
    torch.manual_seed(0)
    model, inputs = models.HF_MODELS["bert"]()
    model.eval()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position="post", drop_path=0.0))
    randomize_adapters(model, seed=1)
    twin = copy.deepcopy(model)
    report = af.fuse_for_inference(model)
    assert sum(v.startswith("fused") and "LayerNorm" in v for v in report.values()) == 2, report
    y, y0 = _run(model, inputs), _run(twin, inputs)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(y.square().sum(), params)
    g0 = torch.autograd.grad(y0.square().sum(), [p for p in twin.parameters() if p.requires_grad])
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adapters_with_their_own_layer_norm_are_reported_not_fused():
    """An adapter with an input LayerNorm inside (AdapterConfig(layer_norm=True)) has no Linear + adapter kernel:
    fuse_for_inference names it and leaves it alone; the model's outputs do not change."""
    torch.manual_seed(0)
    model, inputs = models.HF_MODELS["vit"]()
    model.eval()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position="pfeiffer", drop_path=0.0,
                                                         layer_norm=True))
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        y0 = _run(model, inputs)
    report = af.fuse_for_inference(model)
    assert report and all("own input LayerNorm" in v for v in report.values()), report
    with torch.no_grad():
        assert torch.equal(_run(model, inputs), y0)


def _timm_houlsby(seed):
    torch.manual_seed(0)
    model, inputs = models.timm_standin()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position="houlsby", drop_path=0.0))
    randomize_adapters(model, seed=seed)
    return model, inputs


@pytest.mark.parametrize("active", ["nothing", "proj_drop", "drop2", "both"])
def test_timm_houlsby_sites_fall_back_independently(active, monkeypatch):
    """timm houlsby in training: each site (attention: attn.proj + adapter_attn; FFN: fc2 + adapter) is fused
    while nothing stochastic sits between its Linear and its adapter, else it runs unfused, independently of the
    other; outputs (same seed) and every gradient equal the unfused model's, adapter_attn applied once."""
    model, inputs = _timm_houlsby(seed=5)
    for blk in model.blocks:
        if active in ("proj_drop", "both"):
            blk.attn.proj_drop.p = 0.3
        if active in ("drop2", "both"):
            blk.mlp.drop2.p = 0.3
    model.train()
    twin = copy.deepcopy(model)
    af.fuse_for_inference(model)
    calls = _count_calls(monkeypatch)
    x = inputs["x"]
    torch.manual_seed(11)
    y0 = twin(x)
    torch.manual_seed(11)
    y1 = model(x)
    expected = {"nothing": 4, "proj_drop": 2, "drop2": 2, "both": 0}[active]
    assert len(calls) == expected
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    twin_params = [p for n, p in twin.named_parameters() if p.requires_grad]
    assert any("adapter_attn" in n for n, p in model.named_parameters() if p.requires_grad)
    g1 = torch.autograd.grad(y1.square().sum(), params)
    g0 = torch.autograd.grad(y0.square().sum(), twin_params)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_remove_adapters_after_fuse_for_inference_gives_the_plain_model():
    """remove_adapters on a fused model (timm houlsby: swapped block forwards and attn.proj; transformers: swapped
    Linear / output forwards) leaves the model without adapters, not a model still running them."""
    model, inputs = _timm_houlsby(seed=6)
    plain = copy.deepcopy(model)
    af.remove_adapters(plain)
    af.fuse_for_inference(model)
    removed = af.remove_adapters(model)
    assert len(removed) == 4
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs), plain(**inputs))
    torch.manual_seed(0)
    hf_model, hf_inputs = models.HF_MODELS["vit"]()
    with torch.no_grad():
        y_plain = _run(hf_model, hf_inputs)
    af.add_adapters(hf_model, af.AdapterConfig.adapter_plus(bottleneck=4, position="houlsby", drop_path=0.0))
    randomize_adapters(hf_model, seed=7)
    af.fuse_for_inference(hf_model)
    af.remove_adapters(hf_model)
    assert not any("forward" in m.__dict__ for m in hf_model.modules())
    with torch.no_grad():
        assert torch.equal(_run(hf_model, hf_inputs), y_plain)


def test_transformers5_vit_layer_with_active_dropout_runs_unfused_and_exact(monkeypatch):
    """transformers 5's ViT layer fused at the post position: with its dropout active (training) the layer runs
    its own forward and then the adapter, as add_adapters' hook did; in eval the tail is one fused call."""
    torch.manual_seed(0)
    model = models.ViT5Standin(dropout=0.3)
    inputs = {"patches": torch.randn(2, 5, 12)}
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, position="post", drop_path=0.0))
    randomize_adapters(model, seed=4)
    model.train()
    twin = copy.deepcopy(model)
    report = af.fuse_for_inference(model)
    assert sorted(report.values()) == ["fused into layers.0.mlp.fc2 (before)", "fused into layers.1.mlp.fc2 (before)"]
    calls = _count_calls(monkeypatch)
    _seeded_pair(model, twin, inputs, calls)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(model, inputs), _run(twin, inputs), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
