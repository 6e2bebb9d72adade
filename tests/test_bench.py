"""The benchmark harness runs end to end (tiny shapes, not timed), writes well-formed JSON and a
plot, and the regression compare flags what it should. No test asserts a wall time."""
import copy
import json

import pytest
import torch

from adapterfuse.bench import compare, op, report


@pytest.fixture(scope="module")
def tiny_rows():
    dev = torch.device("cpu")
    return op.run_op_benchmark(dev, shapes=[op.Shape("tiny", 96, 40)], ranks=(4,), dtypes=[torch.float32],
                               quick=True, log=lambda s: None)


def test_op_benchmark_rows(tiny_rows):
    variants = {(r["mode"], r["variant"]) for r in tiny_rows}
    for mode in ("fwd", "train"):
        for v in ("eager", "compile", "frozen", "lora"):
            assert (mode, v) in variants
    assert ("fwd", "lora_merged") in variants and ("train", "lora_merged") not in variants
    for r in tiny_rows:
        assert r["ms"] > 0 and r["M"] == 96 and r["d"] == 40 and r["r"] == 4
        if r["variant"] in ("eager", "compile") or r["variant"].startswith("fused_"):
            assert r["gbs"] > 0
        if r["variant"].startswith("lora"):
            assert "overhead_vs_frozen_ms" in r


def _result(rows, device="test-device"):
    return {"meta": {"device": device, "torch": torch.__version__, "copy_bandwidth_gbs": 10.0}, "op": rows, "model": []}


def _case(variant, ms, **kw):
    row = dict(shape="s", M=1, d=2, r=3, dtype="float32", mode="fwd", variant=variant, ms=ms)
    row.update(kw)
    return row


def test_compare_flags_slowdown_and_lost_lead():
    base = _result([_case("fused_cpu", 10.0), _case("eager", 30.0)])
    ok = _result([_case("fused_cpu", 10.5), _case("eager", 31.0)])
    assert compare.compare(ok, base, 0.10)[0] == []
    slow = _result([_case("fused_cpu", 11.5), _case("eager", 31.0)])
    failures, _ = compare.compare(slow, base, 0.10)
    assert len(failures) == 1 and "slower" in failures[0]
    lost = _result([_case("fused_cpu", 10.0), _case("eager", 9.0)])
    failures, _ = compare.compare(lost, base, 0.10)
    assert any("lead over eager" in f for f in failures)


def test_compare_is_relative_to_eager_unless_absolute():
    base = _result([_case("fused_cpu", 10.0), _case("eager", 30.0)])
    busy = _result([_case("fused_cpu", 20.0), _case("eager", 60.0)])  # the whole machine twice as slow
    assert compare.compare(busy, base, 0.10)[0] == []
    failures, _ = compare.compare(busy, base, 0.10, absolute=True)
    assert len(failures) == 1 and "slower" in failures[0]


def test_compare_other_device_checks_only_the_lead():
    base = _result([_case("fused_cpu", 10.0), _case("eager", 30.0)], device="A")
    new = _result([_case("fused_cpu", 25.0), _case("eager", 60.0)], device="B")
    failures, notes = compare.compare(new, base, 0.10)
    assert failures == [] and any("devices differ" in n for n in notes)


def test_compare_cli_exit_codes(tmp_path):
    base, new = tmp_path / "b.json", tmp_path / "n.json"
    base.write_text(json.dumps(_result([_case("fused_cpu", 10.0), _case("eager", 30.0)])))
    new.write_text(json.dumps(_result([_case("fused_cpu", 20.0), _case("eager", 30.0)])))
    assert compare.main([str(new), str(base)]) == 1
    assert compare.main([str(new), str(base), "--tolerance", "1.5"]) == 0


def test_report_table_json_and_plot(tiny_rows, tmp_path):
    result = _result(copy.deepcopy(tiny_rows))
    text = report.op_table(result["op"], 10.0)
    assert "eager" in text and "tiny" in text
    path = report.save_json(result, tmp_path / "r.json")
    assert json.loads(path.read_text())["op"][0]["shape"] == "tiny"
    pytest.importorskip("matplotlib")
    png = report.plot(result, tmp_path / "r.png", log=lambda s: None)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help_and_bad_shape(capsys):
    from adapterfuse.bench import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert main(["--shapes", "nonsense", "--no-model", "--no-plot"]) == 2


def test_overhead_section_rows_and_table():
    """The per-call overhead section runs (tiny, not timed) and reports fused, module and eager per mode."""
    from adapterfuse.bench import overhead

    if "cpu" not in __import__("adapterfuse").available_backends():
        pytest.skip("the overhead section times the C++ CPU path on CPU")
    rows = overhead.run_overhead_benchmark(torch.device("cpu"), shapes=((2, 16),), quick=True, log=lambda s: None)
    assert {(r["mode"], r["variant"]) for r in rows} == {(m, v) for m in ("fwd", "train")
                                                         for v in ("eager", "fused_cpu", "module_cpu")}
    for r in rows:
        assert r["us"] > 0 and r["M"] == 2 and r["d"] == 16 and r["r"] == 8
        assert r["ratio_vs_eager"] == pytest.approx(r["us"] / next(
            e["us"] for e in rows if e["variant"] == "eager" and e["mode"] == r["mode"]), rel=0.01)
    assert "fused_cpu" in overhead.overhead_table(rows)


def test_mixed_batch_section_rows_and_table():
    """The mixed-batch section runs (tiny, not timed): bank, single, and both loops per ids kind and mode."""
    from adapterfuse.bench import mixed

    if "cpu" not in __import__("adapterfuse").available_backends():
        pytest.skip("the mixed-batch section times the C++ CPU bank on CPU")
    rows = mixed.run_mixed_benchmark(torch.device("cpu"), quick=True, d=16, r=2, sizes=(("tiny", 3, 4),),
                                     adapters=(2,), log=lambda s: None)
    assert {(r["ids"], r["mode"], r["variant"]) for r in rows} == {
        (i, m, v) for i in ("sample", "token") for m in ("fwd", "train")
        for v in ("bank", "single", "loop_fused", "loop_eager")}
    assert all(r["ms"] > 0 and r["M"] == 12 and r["A"] == 2 for r in rows)
    assert "loop_fused" in mixed.mixed_table(rows)


def test_mixed_model_section_rows_and_table():
    """The model-level mixed-batch section runs (tiny, not timed): every variant that is installed, PEFT's
    mixed batch forward only."""
    pytest.importorskip("transformers")
    from adapterfuse.bench import mixed

    rows = mixed.run_mixed_model_benchmark(torch.device("cpu"), quick=True, d=32, r=2, sizes=(("tiny", 3, 4),),
                                           adapters=(2,), log=lambda s: None)
    variants = {(r["mode"], r["variant"]) for r in rows}
    assert {("fwd", "frozen"), ("fwd", "af_bank"), ("train", "af_bank")} <= variants
    try:
        import adapters  # noqa: F401

        assert {("fwd", "hub_batchsplit"), ("train", "hub_batchsplit_fused")} <= variants
    except ImportError:
        pass
    assert ("train", "peft_lora_mixed") not in variants and ("train", "frozen") not in variants
    assert all(r["ms"] > 0 and r["A"] == 2 and r["B"] == 3 for r in rows)
    for r in rows:  # paired figures: against the frozen model in the forward, against BatchSplit when installed
        assert (r["adapter_ms"] is not None) == (r["mode"] == "fwd"), r
        assert (r["ratio_vs_frozen"] is not None) == (r["mode"] == "fwd"), r
        if r["ratio_vs_hub"] is not None:
            assert r["hub_q1"] <= r["ratio_vs_hub"] <= r["hub_q3"], r
    frozen = [r for r in rows if r["variant"] == "frozen"]
    assert all(r["ratio_vs_frozen"] == 1.0 and r["adapter_ms"] == 0.0 for r in frozen)
    assert "af_bank" in mixed.mixed_model_table(rows)


def test_linear_section_rows_and_table():
    """The Linear + adapter section runs (tiny, not timed): every op variant, and the quick ViT inference."""
    from adapterfuse.bench import linear

    rows = linear.run_linear_op_benchmark(torch.device("cpu"), quick=True, shapes=(("tiny", 8, 12, 16),),
                                          log=lambda s: None)
    assert {r["variant"] for r in rows} == {"frozen", "frozen_inplace", "lora_merged", "linear_then_adapter",
                                            "fused_linear_adapter"}
    assert all(r["ms"] > 0 and r["M"] == 8 and r["k"] == 12 and r["d"] == 16 for r in rows)
    model_rows = []
    if __import__("importlib").util.find_spec("transformers"):
        model_rows = linear.run_linear_model_benchmark(torch.device("cpu"), quick=True, batch=1, log=lambda s: None)
        assert {r["variant"] for r in model_rows} == {"frozen", "adapter_plus", "adapter_plus_in_linear"}
    assert "fused_linear_adapter" in linear.linear_table(rows, model_rows)


def test_ln_dropout_section_rows_and_table():
    """The LayerNorm / dropout section runs (tiny, not timed): every variant in both modes."""
    from adapterfuse.bench import ln_dropout

    rows = ln_dropout.run_ln_dropout_benchmark(torch.device("cpu"), quick=True, shapes=(("tiny", 10, 24),),
                                               log=lambda s: None)
    assert {(r["mode"], r["variant"]) for r in rows} == {
        (m, v) for m in ("fwd", "train") for v in ("eager", "ln_torch_dropout_torch", "fused", "fused_plain")}
    assert all(r["ms"] > 0 and r["M"] == 10 and r["d"] == 24 for r in rows)
    assert "ln_torch_dropout_torch" in ln_dropout.ln_dropout_table(rows)
