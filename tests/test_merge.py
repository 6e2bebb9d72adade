"""Merging into weights: exact in float64, unmerge restores every weight bit for bit, non-finite refused."""
import pytest
import torch

import adapterfuse as af
from adapterfuse.merge import fold_scale, merge_into_linear, unfold_scale, unmerge_from_linear
import models
from helpers import randomize_adapters

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("scaling", [0.7, "learned", "channel"])
def test_fold_scale_is_exact_and_reversible(scaling):
    torch.manual_seed(0)
    a = af.Adapter(12, 3, scaling=scaling, activation="gelu", backend="torch").double().eval()
    randomize_adapters(a)
    x = torch.randn(5, 12, dtype=torch.float64)
    before = a(x, skip=x)
    params = {n: p.detach().clone() for n, p in a.named_parameters()}
    fold_scale(a)
    assert a.scale == 1.0 and not isinstance(a.scale, torch.nn.Parameter)
    assert torch.allclose(a(x, skip=x), before, rtol=1e-12, atol=1e-12)
    unfold_scale(a)
    for n, p in a.named_parameters():
        assert torch.equal(p, params[n]), n
    assert set(dict(a.named_parameters())) == set(params)


@pytest.mark.parametrize("where", ["after", "beside"])
@pytest.mark.parametrize("scaling", [1.5, "channel"])
def test_identity_adapter_merges_exactly_into_a_linear(where, scaling):
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 8, dtype=torch.float64)
    dim = 8
    a = af.Adapter(dim, 3, activation="identity", scaling=scaling, backend="torch").double().eval()
    randomize_adapters(a)
    z = torch.randn(4, 10, dtype=torch.float64)
    if where == "after":
        def f():
            out = lin(z)
            return a(out, skip=out)
    else:
        lin = torch.nn.Linear(8, 8, dtype=torch.float64)
        z = torch.randn(4, 8, dtype=torch.float64)

        def f():
            return a(z, skip=lin(z))
    before = f()
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    merge_into_linear(a, lin, where)
    assert a.merged
    assert torch.allclose(lin(z), before, rtol=1e-12, atol=1e-12)  # the Linear alone now computes it all
    assert torch.allclose(f(), before, rtol=1e-12, atol=1e-12)     # and the adapter passes the skip through
    unmerge_from_linear(a)
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0) and not a.merged
    assert torch.allclose(f(), before, rtol=1e-12, atol=1e-12)


def test_nonlinear_adapter_is_not_merged_into_a_linear():
    a = af.Adapter(8, 2, activation="gelu").eval()
    with pytest.raises(ValueError, match="identity"):
        merge_into_linear(a, torch.nn.Linear(8, 8))


def test_non_finite_merge_is_refused_and_nothing_changes():
    lin = torch.nn.Linear(4, 4)
    a = af.Adapter(4, 2, activation="identity", init="bert").eval()
    with torch.no_grad():
        a.up.weight.fill_(float("inf"))
    w0 = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        merge_into_linear(a, lin)
    assert torch.equal(lin.weight, w0) and not a.merged
    with pytest.raises(ValueError, match="non-finite"):
        fold_scale(a)


def test_model_merge_report_and_exact_unmerge():
    torch.manual_seed(0)
    model = models.hf_bert(hidden=16, intermediate=32, vocab=30)[0].double()
    af.add_adapters(model, af.AdapterConfig.houlsby(bottleneck=3, activation="identity", scaling="channel"),
                    backend="torch")
    for m in model.modules():
        if isinstance(m, af.Adapter):
            randomize_adapters(m, std=0.2)
    ids = torch.randint(0, 30, (2, 5))
    before = model(input_ids=ids).last_hidden_state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    report = af.merge(model)
    assert len(report) == 4 and all(v.startswith("merged into") for v in report.values()), report
    assert torch.allclose(model(input_ids=ids).last_hidden_state, before, rtol=1e-10, atol=1e-10)
    af.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.allclose(model(input_ids=ids).last_hidden_state, before, rtol=1e-12, atol=1e-12)


def test_model_merge_folds_nonlinear_adapters_and_merges_lora():
    torch.manual_seed(0)
    model = models.hf_vit(hidden=16, layers=1, intermediate=32)[0].double()
    af.add_adapters(model, af.AdapterConfig.adapter_plus(bottleneck=3), backend="torch")
    model.pooler = af.LoRALinear(torch.nn.Linear(16, 16, dtype=torch.float64), r=2)
    for m in model.modules():
        if isinstance(m, af.Adapter):
            randomize_adapters(m, std=0.2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = model(pixel_values=x).last_hidden_state
    report = af.merge(model)
    assert any("scale folded" in v for v in report.values()) and report["pooler"].startswith("LoRA merged")
    assert torch.allclose(model(pixel_values=x).last_hidden_state, before, rtol=1e-12, atol=1e-12)
    af.unmerge(model)
    post = [m for n, m in model.named_modules() if n.endswith(".adapterfuse_post")]  # (transformers 4 / 5 paths)
    assert len(post) == 1 and isinstance(post[0].scale, torch.nn.Parameter)


def test_merge_refuses_training_mode_with_drop_path():
    model = torch.nn.Sequential(af.Adapter(4, 2, drop_path=0.1))
    report = af.merge(model)
    assert "training mode" in report["0"]


def test_merge_is_the_module_and_callable():
    """Naming trap: `from .merge import merge` used to bind the function over the module, so after
    `import adapterfuse.merge` the module's helpers were unreachable as attributes."""
    import importlib

    import adapterfuse
    import adapterfuse.merge

    assert adapterfuse.merge.fold_scale is fold_scale and adapterfuse.merge.merge_into_linear is merge_into_linear
    assert importlib.import_module("adapterfuse.merge") is adapterfuse.merge is adapterfuse.merging
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), af.Adapter(8, 4, activation="identity"))
    model.eval()
    x = torch.randn(3, 8)
    before = model(x)
    report = adapterfuse.merge(model)
    assert report and torch.allclose(model(x), before, atol=1e-5)
    adapterfuse.unmerge(model)
