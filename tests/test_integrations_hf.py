"""add_adapters on transformers models built from small local configs (no download): every position,
outputs unchanged when the adapters are zeroed, fused == reference in values and gradients, freezing,
and the adapters living in the model's state dict."""
import pytest
import torch

import adapterfuse as af
from adapterfuse.integrations.hf import adapter_modules
from helpers import cpu_backends, rel_err, zero_adapter_outputs
from models import hf_bert, hf_llama, hf_vit, vit5_standin

transformers = pytest.importorskip("transformers")

POSITIONS = ("post", "pre", "intermediate", "pfeiffer", "houlsby", "parallel")


vit, bert, llama = hf_vit, hf_bert, hf_llama
MODELS = {"vit": vit, "vit5": vit5_standin, "bert": bert, "llama": llama}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("position", POSITIONS)
def test_positions(family, position):
    torch.manual_seed(0)
    model, inputs = MODELS[family]()
    base = model(**inputs).last_hidden_state
    cfg = af.AdapterConfig.adapter_plus(bottleneck=4, position=position, drop_path=0.0)
    names = af.add_adapters(model, cfg, backend="torch")
    assert len(names) == (4 if position == "houlsby" else 2)
    adapters = adapter_modules(model)
    assert set(adapters) == set(names)
    zero_adapter_outputs(model)
    assert torch.allclose(model(**inputs).last_hidden_state, base, atol=1e-6)  # a zero adapter is the identity
    for a in adapters.values():
        torch.nn.init.normal_(a.up.weight, std=0.3)
    assert not torch.allclose(model(**inputs).last_hidden_state, base, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_matches_reference_in_a_model(backend):
    torch.manual_seed(0)
    model, inputs = vit()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4, drop_path=0.0), backend=backend)
    for a in adapter_modules(model).values():
        torch.nn.init.normal_(a.up.weight, std=0.3)
    out = model(**inputs).last_hidden_state
    # a fixed random projection: the final LayerNorm makes sum(out^2) nearly constant, whose gradients
    # would be fp32 cancellation noise
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * w).sum(), [p for p in model.parameters() if p.requires_grad])
    for a in adapter_modules(model).values():
        a.backend = "torch"
    ref = model(**inputs).last_hidden_state
    ref_grads = torch.autograd.grad((ref * w).sum(), [p for p in model.parameters() if p.requires_grad])
    assert rel_err(out, ref) < 1e-5
    for g, gr in zip(grads, ref_grads):
        assert rel_err(g, gr) < 1e-4


def test_freezing_and_state_dict():
    model, _ = bert()
    af.add_adapters(model, af.AdapterConfig.pfeiffer(bottleneck=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapterfuse_" in n for n in trainable)
    keys = model.state_dict().keys()
    assert any(k.endswith("adapterfuse_ffn.down.weight") for k in keys)
    model2, _ = bert()
    af.add_adapters(model2, af.AdapterConfig.pfeiffer(bottleneck=4), freeze=False)
    assert all(p.requires_grad for p in model2.parameters())
    model2.load_state_dict(model.state_dict())  # same keys


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="no supported transformer layer"):
        af.add_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), af.AdapterConfig())


def test_adapters_follow_the_model_mode():
    model, _ = vit()  # eval mode
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4))
    assert all(not a.training for a in adapter_modules(model).values())
    model.train()
    assert all(a.training for a in adapter_modules(model).values())


def test_a_layer_of_an_unknown_structure_is_refused_before_anything_changes():
    """A class named like a supported layer whose submodules match no known transformers release's layout."""
    import models

    model, _ = vit5_standin()
    del model.layers[1].mlp.fc2  # layer 1 matches neither the transformers 4 nor the transformers 5 layout
    with pytest.raises(ValueError, match="none of the module structures adapterfuse knows"):
        af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=4))
    assert not adapter_modules(model) and not any(m._forward_hooks for m in model.modules())
    assert isinstance(model.layers[0], models.ViTLayer)
