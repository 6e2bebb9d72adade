"""Model lifecycles with add_adapters (issue 9, items 2-5): deepcopy gives an independent model, torch.save of
the whole model round-trips, a state dict loads into a fresh model with adapters, a second add_adapters is
refused (remove_adapters undoes the first), and a model saved while merged loads to the same outputs.
Transformers models (ViT, BERT, LLaMA) and the timm path (a stand-in block, see models.py)."""
import copy
import io
import sys
import types

import pytest
import torch
from torch import nn

import adapterfuse as af
import models
from helpers import randomize_adapters

POSITIONS = ("post", "pre", "intermediate", "pfeiffer", "houlsby", "parallel")
FAMILIES = ("vit", "vit5", "bert", "llama", "timm")


@pytest.fixture
def timm_pickle(monkeypatch):
    """Let pickle find the stand-in timm Block under the module name it claims (only for this test). Where the real
    timm is imported (the GPU machine has it), its Block is the stand-in's for the test's duration."""
    real = sys.modules.get("timm.models.vision_transformer")
    if real is not None:
        monkeypatch.setattr(real, "Block", models.Block)
        return
    for name in ("timm", "timm.models"):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", models)


def build(family, position, seed=0, activation="gelu"):
    torch.manual_seed(seed)
    if family == "timm":
        model, inputs = models.timm_standin()
    else:
        pytest.importorskip("transformers")
        model, inputs = models.HF_MODELS[family]()
    cfg = af.AdapterConfig.adapter_plus(bottleneck=4, position=position, drop_path=0.0, activation=activation)
    af.add_adapters(model, cfg)
    randomize_adapters(model, seed=seed + 100)
    return model, inputs, cfg


def out(model, inputs):
    with torch.no_grad():
        y = model(**inputs)
    return y if isinstance(y, torch.Tensor) else y.last_hidden_state


def adapters_of(model):
    return [m for m in model.modules() if isinstance(m, af.Adapter)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", POSITIONS)
def test_deepcopy_is_independent(family, position):
    model, inputs, _ = build(family, position)
    before = out(model, inputs)
    twin = copy.deepcopy(model)
    assert torch.equal(out(twin, inputs), before)
    assert not set(map(id, adapters_of(twin))) & set(map(id, adapters_of(model)))
    randomize_adapters(model, seed=7)  # change the original's adapters only
    assert torch.equal(out(twin, inputs), before), "the copy still runs the original's adapters"
    assert not torch.allclose(out(model, inputs), before)
    randomize_adapters(twin, seed=7)
    assert torch.allclose(out(twin, inputs), out(model, inputs), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", POSITIONS)
def test_torch_save_whole_model(family, position, timm_pickle):
    model, inputs, _ = build(family, position)
    before = out(model, inputs)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(out(loaded, inputs), before)
    randomize_adapters(loaded, seed=3)  # the loaded model's hooks run the loaded model's adapters
    assert not torch.allclose(out(loaded, inputs), before)
    assert torch.equal(out(model, inputs), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", POSITIONS)
def test_state_dict_into_fresh_model(family, position):
    model, inputs, cfg = build(family, position)
    before = out(model, inputs)
    sd = model.state_dict()
    fresh, _, _ = build(family, position, seed=0)
    randomize_adapters(fresh, seed=11)
    fresh.load_state_dict(sd)  # strict
    assert torch.equal(out(fresh, inputs), before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", ("post", "houlsby", "parallel"))
def test_add_twice_is_refused_and_remove_undoes(family, position):
    model, inputs, cfg = build(family, position)
    n_adapters = len(adapters_of(model))
    with pytest.raises(ValueError, match="already has"):
        af.add_adapters(model, cfg)
    assert len(adapters_of(model)) == n_adapters  # nothing half-added
    removed = af.remove_adapters(model)
    assert len(removed) == n_adapters and not adapters_of(model)
    assert not any(".adapter" in k for k in model.state_dict())
    torch.manual_seed(0)
    base = models.timm_standin()[0] if family == "timm" else models.HF_MODELS[family]()[0]
    assert torch.equal(out(model, inputs), out(base, inputs)), "remove_adapters left something behind"
    af.add_adapters(model, cfg)  # and adding again works
    assert len(adapters_of(model)) == n_adapters


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position,activation", [("post", "gelu"), ("intermediate", "identity"),
                                                 ("houlsby", "identity"), ("pfeiffer", "gelu"),
                                                 ("parallel", "identity")])
def test_merge_then_save_then_load(family, position, activation, timm_pickle):
    """state_dict() holds unmerged weights while merged: loading it into a fresh (unmerged) model gives
    the merged model's outputs, loading into a merged model is refused, whole-model save keeps merges."""
    model, inputs, cfg = build(family, position, activation=activation)
    model.eval()
    before = out(model, inputs)
    report = af.merge(model)
    assert report
    merged_out = out(model, inputs)
    assert torch.allclose(merged_out, before, atol=1e-5)
    sd = model.state_dict()
    fresh, _, _ = build(family, position, activation=activation, seed=5)
    fresh.load_state_dict(sd)  # strict: the folded scale is in the state dict too
    assert torch.allclose(out(fresh, inputs), before, atol=1e-5)
    af.merge(fresh)
    assert torch.allclose(out(fresh, inputs), merged_out, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        fresh.load_state_dict(sd)
    af.unmerge(fresh)
    fresh.load_state_dict(sd)
    assert torch.allclose(out(fresh, inputs), before, atol=1e-5)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(out(loaded, inputs), merged_out)
    af.unmerge(loaded)
    assert torch.allclose(out(loaded, inputs), before, atol=1e-5)


def test_lora_merge_then_save_then_load():
    torch.manual_seed(0)
    lora = af.LoRALinear(nn.Linear(8, 6), r=2)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 8)
    before = lora(x)
    lora.merge()
    sd = lora.state_dict()
    fresh = af.LoRALinear(nn.Linear(8, 6), r=2)
    fresh.load_state_dict(sd)
    assert torch.allclose(fresh(x), before, atol=1e-6)  # not the delta applied twice
    fresh.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("position", ("post", "houlsby", "parallel"))
def test_add_adapters_keeps_its_hook_handles(position):
    """add_adapters keeps the handle of every hook it registers; remove_adapters removes through them, and a deep
    copy (which carries the hooks, not the handles) is cleaned by type without touching the original."""
    from adapterfuse.integrations.hf import adapter_hook_handles

    model, inputs, cfg = build("bert", position)
    handles = adapter_hook_handles(model)
    assert len(handles) == {"post": 2, "houlsby": 4, "parallel": 4}[position]  # 2 layers
    live = {id_ for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for id_ in d}
    assert all(h.id in live for h in handles)
    twin = copy.deepcopy(model)
    assert adapter_hook_handles(twin) == []
    y = out(model, inputs)
    af.remove_adapters(twin)
    assert torch.equal(out(model, inputs), y), "removing the copy's adapters changed the original"
    af.remove_adapters(model)
    assert adapter_hook_handles(model) == []
    live = {id_ for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for id_ in d}
    assert not any(h.id in live for h in handles)
