"""adapterfuse.integrations.adapters_hub.fuse on models prepared with AdapterHub `adapters` 1.3: outputs
and gradients equal to the unfused model, the same parameters (training the fused model trains what
save_adapter writes), and every config it cannot fuse left alone and named with its reason."""
import copy

import pytest
import torch
from torch import nn

import models
from helpers import cpu_backends, rel_err

adapters = pytest.importorskip("adapters", exc_type=ImportError)
transformers = pytest.importorskip("transformers")
from adapters import (AdapterPlusConfig, CompacterConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig,  # noqa: E402
                      SeqBnInvConfig)

import adapterfuse as af  # noqa: E402
from adapterfuse.integrations import adapters_hub  # noqa: E402

BACKENDS = cpu_backends()


def bert_with(config, name="t"):
    torch.manual_seed(0)
    model = transformers.BertModel(models.bert_config())
    adapters.init(model)
    model.add_adapter(name, config=config)
    model.train_adapter(name)
    model.set_active_adapters(name)
    randomize(model)
    return model


def randomize(model):
    """Random adapter weights and scalings (the `adapters` inits would make many gradients zero)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters" in n and p.dim() == 2:
                p.normal_(std=0.2)
            if n.endswith("scaling"):
                p.normal_(mean=1.0, std=0.3)


def run(model, ids, w):
    y = model(input_ids=ids).last_hidden_state
    params = [p for p in model.parameters() if p.requires_grad]
    # a random projection: BERT ends in a LayerNorm, and sum(y^2) would have only rounding-noise gradients
    return y, torch.autograd.grad((y * w).sum(), params)


CONFIGS = {
    # gated (UniPELT's bottleneck adapter): the per-sample gate is the fused op's sample_scale
    "seq_bn gated": lambda: SeqBnConfig(reduction_factor=4, use_gating=True),
    "par_bn gated": lambda: ParBnConfig(reduction_factor=4, use_gating=True),
    # adapter LayerNorms (run by torch around the fused op), residual before and after the output LayerNorm
    "seq_bn ln_before": lambda: SeqBnConfig(reduction_factor=4, ln_before=True),
    "seq_bn ln_after": lambda: SeqBnConfig(reduction_factor=4, ln_after=True),
    "seq_bn ln_after, residual after it": lambda: SeqBnConfig(reduction_factor=4, ln_after=True,
                                                              adapter_residual_before_ln=False),
    "seq_bn ln_before + ln_after + gating": lambda: SeqBnConfig(reduction_factor=4, ln_before=True, ln_after=True,
                                                                 use_gating=True),
    # dropout inside the adapter: fused where it does nothing (eval; these tests' runs are in eval mode)
    "seq_bn dropout 0.1 (eval)": lambda: SeqBnConfig(reduction_factor=4, dropout=0.1),
    "seq_bn (Pfeiffer)": lambda: SeqBnConfig(reduction_factor=4),
    "double_seq_bn (Houlsby)": lambda: DoubleSeqBnConfig(reduction_factor=4),
    "par_bn": lambda: ParBnConfig(reduction_factor=4),
    "scaled par_bn (channel)": lambda: ParBnConfig(reduction_factor=4, scaling="channel"),
    "scaled par_bn (learned)": lambda: ParBnConfig(reduction_factor=4, scaling="learned"),
    # stochastic depth needs torchvision, which does not import on the CPU machines: tested below with a stand-in
    "adapter_plus (no stochastic depth)": lambda: AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_equals_unfused(config, backend):
    model = bert_with(CONFIGS[config]())
    if "(eval)" in config:
        model.eval()
    ids, w = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 32)
    params_before = {n: p for n, p in model.named_parameters()}
    y64, g64 = run(copy.deepcopy(model).double(), ids, w.double())
    y0, g0 = run(model, ids, w)
    report = adapters_hub.fuse(model, backend=backend)
    assert len(report.fused) == (4 if "Houlsby" in config else 2) and not report.skipped, str(report)
    y1, g1 = run(model, ids, w)
    assert rel_err(y1, y0) < 1e-5
    for a, b, c in zip(g1, g0, g64):  # fused vs unfused, or vs float64 within 4x the unfused model's own error
        # (a gate's gradient through an output LayerNorm is mostly cancellation: fp32 is off by % there)
        assert rel_err(a, b) < 1e-5 or rel_err(a, c) <= 4 * rel_err(b, c) + 1e-6
    assert all(p is params_before[n] for n, p in model.named_parameters())  # no copies
    assert adapters_hub.unfuse(model) == len(report.fused)
    y2, _ = run(model, ids, w)
    assert torch.equal(y2, y0)


class RowStochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth(p, mode="row")'s maths, for machines without torchvision."""

    def __init__(self, p):
        super().__init__()
        self.p, self.mode = p, "row"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * noise.div_(keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_depth_is_fused_per_sample(backend):
    model = bert_with(AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0))
    for m in model.modules():
        if type(m).__name__ == "Adapter":
            m.DropPath = RowStochasticDepth(0.5)
    model.train()
    ids, w = torch.randint(0, 50, (8, 6)), torch.randn(8, 6, 32)
    torch.manual_seed(3)
    y0, g0 = run(model, ids, w)
    adapters_hub.fuse(model, backend=backend)
    torch.manual_seed(3)  # the fused path draws its per-sample mask exactly like torchvision does
    y1, g1 = run(model, ids, w)
    assert rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5


def test_training_the_fused_model_trains_what_save_adapter_writes(tmp_path):
    model = bert_with(SeqBnConfig(reduction_factor=4))
    adapters_hub.fuse(model, backend=BACKENDS[0] if BACKENDS else "torch")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, w = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 32)
    (model(input_ids=ids).last_hidden_state * w).sum().backward()
    opt.step()
    model.save_adapter(str(tmp_path), "t")
    saved = torch.load(tmp_path / "pytorch_adapter.bin")
    live = dict(model.named_parameters())
    assert saved and all(torch.equal(v, live[k].detach()) for k, v in saved.items() if k in live)
    assert any(k in live for k in saved)


@pytest.mark.parametrize("config,why", [
    (lambda: CompacterConfig(reduction_factor=4), "PHM"),
    (lambda: SeqBnConfig(reduction_factor=4, non_linearity="tanh"), "activation"),
])
def test_unsupported_configs_are_left_alone_and_named(config, why):
    model = bert_with(config()).eval()  # eval: the dropout config would differ between two runs otherwise
    ids, w = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 32)
    y0, _ = run(model, ids, w)
    report = adapters_hub.fuse(model)
    assert not report.fused and report.skipped and all(why in r for r in report.skipped.values()), str(report)
    y1, _ = run(model, ids, w)
    assert torch.equal(y0, y1)


def test_invertible_adapter_is_named_and_bottlenecks_fused():
    model = bert_with(SeqBnInvConfig(reduction_factor=4))
    report = adapters_hub.fuse(model)
    assert len(report.fused) == 2
    assert any("invertible" in why for why in report.skipped.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["seq_bn", "par_bn"])
def test_adapters_under_adapter_fusion_fuse(backend, kind):
    """Fuse attends over each adapter's bottleneck output `up`: the fused op computes it and the outputs and
    gradients (adapters, fusion layer) equal the unfused model's; sequential and parallel adapters."""
    if kind == "seq_bn":
        configs = SeqBnConfig(reduction_factor=4, ln_before=True), SeqBnConfig(reduction_factor=4)
    else:
        # (Fuse reads `up` only: a gate or an output LayerNorm would get no gradient in either model)
        configs = ParBnConfig(reduction_factor=4), ParBnConfig(reduction_factor=4, scaling="channel")
    model = bert_with(configs[0], name="a")
    model.add_adapter("b", config=configs[1])
    model.add_adapter_fusion(["a", "b"])
    model.set_active_adapters(adapters.composition.Fuse("a", "b"))
    model.train_adapter_fusion(adapters.composition.Fuse("a", "b"), unfreeze_adapters=True)
    model.eval()
    ids, w = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 32)
    y64, g64 = run(copy.deepcopy(model).double(), ids, w.double())
    y0, g0 = run(model, ids, w)
    report = adapters_hub.fuse(model, backend=backend)
    assert len(report.fused) == 4 and not report.skipped, str(report)
    y1, g1 = run(model, ids, w)
    assert rel_err(y1, y0) < 1e-5
    assert len(g1) == len(g0) > 8
    for a, b, c in zip(g1, g0, g64):  # (some gradients are rounding noise, ~1e-8: then within 4x fp32's error)
        assert rel_err(a, b) < 1e-5 or rel_err(a, c) <= 4 * rel_err(b, c) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_plus_with_torchvision_stochastic_depth(backend):
    """AdapterPlusConfig's default stochastic depth (0.1) needs torchvision: runs where it imports."""
    pytest.importorskip("torchvision")
    model = bert_with(AdapterPlusConfig(reduction_factor=4))
    model.train()
    ids, w = torch.randint(0, 50, (8, 6)), torch.randn(8, 6, 32)
    torch.manual_seed(5)
    y0, g0 = run(model, ids, w)
    report = adapters_hub.fuse(model, backend=backend)
    assert len(report.fused) == 2
    torch.manual_seed(5)
    y1, g1 = run(model, ids, w)
    assert rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5


def test_fusion_added_after_fuse_works():
    """The usual order (add adapters, fuse, then add_adapter_fusion) works and gives the unfused outputs."""
    model = bert_with(SeqBnConfig(reduction_factor=4), name="a")
    model.add_adapter("b", config=SeqBnConfig(reduction_factor=4))
    report = adapters_hub.fuse(model)
    assert len(report.fused) == 4
    model.add_adapter_fusion(["a", "b"])
    model.set_active_adapters(adapters.composition.Fuse("a", "b"))
    ids = torch.randint(0, 50, (2, 6))
    y1 = model(input_ids=ids).last_hidden_state
    adapters_hub.unfuse(model)
    assert rel_err(model(input_ids=ids).last_hidden_state, y1) < 1e-5


def test_gating_scores_requested_with_a_fused_adapter():
    """A non-gated adapter's "score" is its `up` output: the fused path computes it, same outputs and scores."""
    model = bert_with(SeqBnConfig(reduction_factor=4))
    ids = torch.randint(0, 50, (2, 6))
    out0 = model(input_ids=ids, output_adapter_gating_scores=True)
    adapters_hub.fuse(model)
    out1 = model(input_ids=ids, output_adapter_gating_scores=True)
    assert torch.allclose(out0.last_hidden_state, out1.last_hidden_state, atol=1e-6)
    s0, s1 = _gating_scores(out0), _gating_scores(out1)
    assert s0.keys() == s1.keys() and len(s0) >= 2
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6)


def test_fused_adapter_module_pickles_and_model_deep_copies():
    """(A whole `adapters` model does not pickle: adapters.init makes its class dynamically. Its modules do.)"""
    import copy
    import io

    model = bert_with(SeqBnConfig(reduction_factor=4)).eval()
    adapters_hub.fuse(model)
    ids = torch.randint(0, 50, (2, 6))
    y = model(input_ids=ids).last_hidden_state
    module = next(m for m in model.modules() if hasattr(m, "_adapterfuse"))
    x, res = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.forward.module is loaded
    assert torch.equal(loaded(x, res)[0], module(x, res)[0])
    twin = copy.deepcopy(model)
    assert torch.equal(twin(input_ids=ids).last_hidden_state, y)
    fused = [m for m in twin.modules() if hasattr(m, "_adapterfuse")]
    assert fused and all(m.forward.module is m for m in fused)  # each runs its own weights


# ------------------------------------------------------------- mixed batches: BatchSplit and Parallel as one bank


def bert_with_three(config, setup):
    model = bert_with(config, name="a")
    for name in ("b", "c"):
        model.add_adapter(name, config=config)
    model.train_adapter(adapters.composition.Stack("a", "b", "c"))
    model.set_active_adapters(setup)
    torch.manual_seed(1)
    randomize(model)
    return model


def count_bank_calls(monkeypatch):
    calls = {"bank": 0, "single": 0}
    for key, name in (("bank", "fused_adapter_bank"), ("single", "fused_adapter")):
        orig = getattr(adapters_hub, name)

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(adapters_hub, name, counted)
    return calls


MIXED = {
    "BatchSplit seq_bn (learned scaling)": (lambda: SeqBnConfig(reduction_factor=4, scaling="learned"),
                                            lambda: adapters.composition.BatchSplit("a", "b", "c",
                                                                                    batch_sizes=[1, 2, 1])),
    "BatchSplit par_bn (channel scaling)": (lambda: ParBnConfig(reduction_factor=4, scaling="channel"),
                                            lambda: adapters.composition.BatchSplit("a", "b", "c",
                                                                                    batch_sizes=[2, 1, 1])),
    "BatchSplit double_seq_bn (Houlsby)": (lambda: DoubleSeqBnConfig(reduction_factor=4),
                                           lambda: adapters.composition.BatchSplit("c", "a", "b",
                                                                                   batch_sizes=[1, 1, 2])),
    "Parallel seq_bn": (lambda: SeqBnConfig(reduction_factor=4),
                        lambda: adapters.composition.Parallel("a", "b", "c")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MIXED)
def test_batch_split_and_parallel_run_as_one_bank_call(case, backend, monkeypatch):
    """A mixed batch (BatchSplit: samples split between adapters; Parallel: the batch repeated once per adapter)
    runs as one fused_adapter_bank call per bottleneck site, with the unfused model's outputs and gradients."""
    config, setup = MIXED[case]
    model = bert_with_three(config(), setup())
    ids = torch.randint(0, 50, (4, 6))
    rows = 12 if "Parallel" in case else 4
    w = torch.randn(rows, 6, 32)
    y0, g0 = run(model, ids, w)
    report = adapters_hub.fuse(model, backend=backend)
    sites = 4 if "Houlsby" in case else 2
    banked = sites if af.has_bank_kernels(backend) else 0  # (cuda: no bank kernels, each child its own call)
    assert len(report.fused) == 3 * sites and len(report.banked_layers) == banked, str(report)
    calls = count_bank_calls(monkeypatch)
    y1, g1 = run(model, ids, w)
    assert calls == ({"bank": sites, "single": 0} if banked else {"bank": 0, "single": 3 * sites})
    assert y1.shape[0] == rows and rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5
    assert adapters_hub.unfuse(model) == 3 * sites
    assert not any("_adapterfuse_compose" in vars(m) for m in model.modules())
    assert torch.equal(run(model, ids, w)[0], y0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_split_stochastic_depth_per_sample(backend, monkeypatch):
    """Each sample's stochastic depth with its own adapter's p, the masks drawn as `adapters`' loop draws them."""
    model = bert_with_three(AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0),
                            adapters.composition.BatchSplit("a", "b", "c", batch_sizes=[3, 2, 3]))
    for m in model.modules():
        if type(m).__name__ == "Adapter":
            m.DropPath = RowStochasticDepth({"a": 0.5, "b": 0.0, "c": 0.3}[m.name])
    model.train()
    ids, w = torch.randint(0, 50, (8, 6)), torch.randn(8, 6, 32)
    torch.manual_seed(3)
    y0, g0 = run(model, ids, w)
    adapters_hub.fuse(model, backend=backend)
    calls = count_bank_calls(monkeypatch)
    torch.manual_seed(3)
    y1, g1 = run(model, ids, w)
    assert calls["bank"] == (2 if af.has_bank_kernels(backend) else 0)
    assert rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5


def test_mixed_batches_the_bank_cannot_take_run_adapters_loop(monkeypatch):
    """A child left unfused (here: an activation the kernels lack) or a nested block: `adapters`' own
    composition runs (the fused children still fused one by one), with the unfused outputs."""
    model = bert_with(SeqBnConfig(reduction_factor=4), name="a")
    model.add_adapter("b", config=SeqBnConfig(reduction_factor=4, non_linearity="tanh"))
    model.add_adapter("c", config=SeqBnConfig(reduction_factor=4))
    model.train_adapter(adapters.composition.Stack("a", "b", "c"))
    ids = torch.randint(0, 50, (4, 6))
    setups = [adapters.composition.BatchSplit("a", "b", batch_sizes=[2, 2]),
              adapters.composition.BatchSplit("a", adapters.composition.Stack("c", "a"), batch_sizes=[1, 3])]
    expected = []
    for setup in setups:
        model.set_active_adapters(setup)
        expected.append(model(input_ids=ids).last_hidden_state)
    report = adapters_hub.fuse(model)
    assert len(report.banked_layers) == 2 and len(report.skipped) == 2
    calls = count_bank_calls(monkeypatch)
    for setup, y0 in zip(setups, expected):
        model.set_active_adapters(setup)
        assert rel_err(model(input_ids=ids).last_hidden_state, y0) < 1e-5
    assert calls["bank"] == 0 and calls["single"] > 0


def test_banked_layer_deep_copies_with_its_own_weights():
    import copy

    model = bert_with_three(SeqBnConfig(reduction_factor=4),
                            adapters.composition.BatchSplit("a", "b", "c", batch_sizes=[1, 2, 1])).eval()
    adapters_hub.fuse(model)
    ids = torch.randint(0, 50, (4, 6))
    y = model(input_ids=ids).last_hidden_state
    twin = copy.deepcopy(model)
    banked = [m for m in twin.modules() if "_adapterfuse_compose" in vars(m)]
    assert banked and all(m.compose_batch_split.layer is m for m in banked)
    assert torch.equal(twin(input_ids=ids).last_hidden_state, y)


# ------------------------------------------------- gated adapters (UniPELT), dropout, adapters added after fuse()


def _gating_scores(out):
    scores = getattr(out, "adapter_gating_scores", None) or {}
    flat = {}
    for adapter, layers in scores.items():
        for layer, sites in layers.items():
            for site, v in sites.items():
                flat[(adapter, layer, site)] = v
    return flat


@pytest.mark.parametrize("backend", BACKENDS)
def test_unipelt_bottleneck_adapter_fuses_with_gating_scores(backend):
    """UniPELT (gated bottleneck adapter + gated LoRA + gated prefix tuning): the bottleneck adapter fuses (its
    gate is the fused op's per-sample scale), with the unfused outputs, gradients and gating scores."""
    from adapters import UniPELTConfig

    model = bert_with(UniPELTConfig())
    ids, w = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 32)
    y64, g64 = run(copy.deepcopy(model).double(), ids, w.double())
    y0, g0 = run(model, ids, w)
    s0 = _gating_scores(model(input_ids=ids, output_adapter_gating_scores=True))
    report = adapters_hub.fuse(model, backend=backend)
    assert len(report.fused) == 2 and all(".output.adapters." in n for n in report.fused), str(report)
    y1, g1 = run(model, ids, w)
    s1 = _gating_scores(model(input_ids=ids, output_adapter_gating_scores=True))
    assert rel_err(y1, y0) < 1e-5
    for a, b, c in zip(g1, g0, g64):
        assert rel_err(a, b) < 1e-5 or rel_err(a, c) <= 4 * rel_err(b, c) + 1e-6
    assert s0.keys() == s1.keys() and len(s0) >= 2
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6)


class _KernelMaskDropout(nn.Module):
    """nn.Dropout with the fused op's mask (reference.dropout_keep), its seed drawn exactly as fused_adapter draws
    it: the unfused twin of a fused model in training, consuming the same random numbers in the same order."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        from adapterfuse.functional import _seed_tensor
        from adapterfuse.reference import dropout_keep

        seed = _seed_tensor(None)
        d = x.shape[-1]
        keep = dropout_keep(seed, x.numel() // d, d, self.p).reshape(x.shape)
        return x * keep.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ln_before", [False, True])
def test_dropout_in_training_is_fused(backend, ln_before):
    """Dropout inside the adapter in training runs in the fused kernels (a counter-based mask): outputs and
    gradients equal the unfused model's given the same mask; without that mask (torch's own dropout) they
    differ, so the fused path did run. A backend without those kernels (cuda) runs the module's own forward:
    the unfused model's outputs exactly, under the same seed."""
    model = bert_with(SeqBnConfig(reduction_factor=4, dropout=0.3, ln_before=ln_before)).train()
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    ids, w = torch.randint(0, 50, (2, 6)), torch.randn(2, 6, 32)
    if not af.has_ln_dropout_kernels(backend):
        adapters_hub.fuse(model, backend=backend)
        torch.manual_seed(11)
        y0, _ = run(plain, ids, w)
        torch.manual_seed(11)
        y1, _ = run(model, ids, w)
        assert torch.equal(y0, y1)
        return
    for m in twin.modules():
        if type(m).__name__ == "Adapter":
            m.dropout = _KernelMaskDropout(m.dropout.p)
    report = adapters_hub.fuse(model, backend=backend)
    assert len(report.fused) == 2
    torch.manual_seed(11)
    y0, g0 = run(twin, ids, w)
    torch.manual_seed(11)
    y1, g1 = run(model, ids, w)
    assert rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5
    torch.manual_seed(11)
    y2, _ = run(plain, ids, w)
    assert rel_err(y2, y0) > 1e-3
    model.eval()
    twin.eval()
    assert rel_err(run(model, ids, w)[0], run(twin, ids, w)[0]) < 1e-5  # eval: no dropout on either side


def test_adapters_added_after_fuse_are_fused_on_first_use(monkeypatch):
    """An adapter added (or loaded) after fuse() is fused on its first forward; one that cannot be is named in a
    warning and runs unfused; fuse() called again is safe."""
    model = bert_with(SeqBnConfig(reduction_factor=4), name="a")
    adapters_hub.fuse(model)
    model.add_adapter("late", config=SeqBnConfig(reduction_factor=4))
    model.add_adapter("odd", config=SeqBnConfig(reduction_factor=4, non_linearity="tanh"))
    randomize(model)
    ids = torch.randint(0, 50, (2, 6))
    reference = copy.deepcopy(model)
    adapters_hub.unfuse(reference)
    for name in ("late", "odd"):
        model.set_active_adapters(name)
        reference.set_active_adapters(name)
        if name == "odd":
            with pytest.warns(RuntimeWarning, match="added after fuse"):
                y = model(input_ids=ids).last_hidden_state
        else:
            y = model(input_ids=ids).last_hidden_state
        assert rel_err(y, reference(input_ids=ids).last_hidden_state) < 1e-5
    late = [m for n, m in model.named_modules() if n.endswith("adapters.late")]
    odd = [m for n, m in model.named_modules() if n.endswith("adapters.odd")]
    assert late and all(isinstance(m.__dict__.get("forward"), adapters_hub._FusedForward) for m in late)
    assert odd and not any(isinstance(m.__dict__.get("forward"), adapters_hub._FusedForward) for m in odd)
    again = adapters_hub.fuse(model)  # safe: re-fuses, reports
    assert len(again.fused) == 4 and len(again.skipped) == 2
    model.set_active_adapters("late")
    reference.set_active_adapters("late")
    assert rel_err(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state) < 1e-5
