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


def test_speedups_join_rows_from_separate_passes():
    """compile_max runs as a pass of its own on a GPU: the fused rows still get their lead over it, and no row
    gets a ratio to itself or to another case."""
    rows = [_case("fused_triton", 2.0), _case("eager", 8.0), _case("compile", 4.0), _case("frozen", 1.0),
            _case("lora", 1.5), _case("fused_triton", 3.0, r=64), _case("compile_max", 3.0)]
    op.add_speedups(rows)
    fused = rows[0]
    assert (fused["speedup_vs_eager"], fused["speedup_vs_compile"], fused["speedup_vs_compile_max"]) == (4.0, 2.0, 1.5)
    assert rows[2]["speedup_vs_eager"] == 2.0 and "speedup_vs_compile" not in rows[2]
    assert rows[6]["speedup_vs_eager"] == 8.0 / 3.0 and "speedup_vs_compile_max" not in rows[6]
    assert rows[4]["overhead_vs_frozen_ms"] == 0.5 and "speedup_vs_eager" not in rows[4]
    assert not any(k.startswith("speedup") for k in rows[5])  # r = 64: no eager / compile row of its case
    assert "xcmax" in report.op_table(rows, 10.0)


def test_compile_max_variant_runs():
    rows = op.run_op_benchmark(torch.device("cpu"), shapes=[op.Shape("tiny", 32, 24)], ranks=(4,),
                               dtypes=[torch.float32], modes=["fwd"], variants=["compile_max", "eager"], quick=True,
                               log=lambda s: None)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"compile_max", "eager"} and by["compile_max"]["ms"] > 0
    assert by["compile_max"]["speedup_vs_eager"] == by["eager"]["ms"] / by["compile_max"]["ms"]


def test_time_budget_skips_and_the_json_says_so(tmp_path):
    from adapterfuse.bench import main

    assert main(["--quick", "--time-budget", "0", "--out", str(tmp_path), "--no-plot"]) == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    meta = result["meta"]
    assert meta["complete"] is False and meta["failed"] == [] and meta["time_budget_s"] == 0
    assert meta["skipped"] == ["section op", "section model", "section overhead", "section mixed", "section linear",
                               "section ln_dropout"]
    assert result["op"] == [] and result["model"] == []


def test_deadline_skips_op_cases_and_records_failing_variants(monkeypatch):
    from adapterfuse.bench.timing import Deadline

    done = Deadline(0)
    rows = op.run_op_benchmark(torch.device("cpu"), shapes=[op.Shape("tiny", 32, 24)], ranks=(4, 8),
                               dtypes=[torch.float32], modes=["fwd"], variants=["eager"], quick=True,
                               log=lambda s: None, deadline=done)
    assert rows == [] and len(done.skipped) == 2 and done.skipped[0].startswith("op tiny r=4 float32 fwd")

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(op, "adapter_reference", broken)
    live = Deadline(None)
    rows = op.run_op_benchmark(torch.device("cpu"), shapes=[op.Shape("tiny", 32, 24)], ranks=(4,),
                               dtypes=[torch.float32], modes=["fwd"], variants=["eager", "frozen"], quick=True,
                               log=lambda s: None, deadline=live)
    assert [r["variant"] for r in rows] == ["frozen"]
    assert len(live.failed) == 1 and "eager: RuntimeError: kernel exploded" in live.failed[0]
    with pytest.raises(RuntimeError, match="kernel exploded"):  # without a deadline: raised, as before
        op.run_op_benchmark(torch.device("cpu"), shapes=[op.Shape("tiny", 32, 24)], ranks=(4,),
                            dtypes=[torch.float32], modes=["fwd"], variants=["eager"], quick=True, log=lambda s: None)


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


def test_targets_report_counts_and_worst_cases(tmp_path, capsys):
    from adapterfuse.bench import targets

    rows = [_case("fused_triton", 1.0, gbs=9.0), _case("fused_cuda", 1.2, gbs=7.5), _case("eager", 4.0),
            _case("compile", 1.4), _case("compile_max", 1.1),
            _case("fused_triton", 2.0, mode="train"), _case("fused_cuda", 2.1, mode="train"),
            _case("eager", 5.0, mode="train"), _case("compile", 3.0, mode="train")]
    op.add_speedups(rows)
    model = [dict(model="vit_b16", mode=m, variant=v, ms=ms) for m, v, ms in
             (("train", "adapter_fused", 9.0), ("train", "lora", 10.0), ("infer", "frozen", 5.0),
              ("infer", "adapter_fused", 5.25))]
    result = _result(rows)
    result["model"] = model
    checks = {c["target"]: c for c in targets.evaluate(result)}
    roof = checks["triton forward, % of copy bandwidth"]
    assert (roof["cases"], roof["met"], roof["worst"]) == (1, 1, 90.0)  # 9 of the copy's 10 GB/s
    assert checks["cuda forward, % of copy bandwidth"]["met"] == 0
    assert checks["triton forward vs eager"]["worst"] == 4.0 and checks["triton forward vs eager"]["met"] == 1
    assert checks["cuda forward vs compile"]["met"] == 0  # 1.4 / 1.2 < 1.5
    assert checks["triton forward vs max-autotune"]["worst"] == 1.1 / 1.0
    assert checks["triton training vs compile"]["worst"] == 1.5 and checks["triton training vs compile"]["met"] == 1
    cuda = checks["cuda time / triton time"]
    assert cuda["cases"] == 2 and cuda["met"] == 1 and cuda["worst"] == 1.2  # forward 1.2x: missed; training 1.05x
    assert checks["model training step, Adapter+ fused / PEFT LoRA"]["met"] == 1
    infer = checks["model inference, Adapter+ fused over frozen"]
    assert infer["met"] == 0 and abs(infer["worst"] - 5.0) < 1e-9
    text = targets.targets_table(list(checks.values()))
    assert "| cuda time / triton time | <= 1.1x | 1 / 2 | 1.20x (s r=3 fp32 fwd) |" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert targets.main([str(path)]) == 0 and "targets on test-device" in capsys.readouterr().out
    assert targets.main([str(tmp_path / "missing.json")]) == 2


def test_rows_are_handed_over_case_by_case():
    """main() writes them into the JSON as they come, so a run stopped from outside keeps every finished case."""
    seen = []
    rows = op.run_op_benchmark(torch.device("cpu"), shapes=[op.Shape("tiny", 32, 24)], ranks=(4, 8),
                               dtypes=[torch.float32], modes=["fwd"], variants=["eager", "frozen"], quick=True,
                               log=lambda s: None, on_rows=lambda rs: seen.append([(r["r"], r["variant"]) for r in rs]))
    assert seen == [[(4, "eager"), (4, "frozen")], [(8, "eager"), (8, "frozen")]] and len(rows) == 4


_FAULTS = """
import resource, sys, torch
from adapterfuse.bench.timing import keep_freed_host_memory
set_ = keep_freed_host_memory() if sys.argv[1] == "keep" else None
for _ in range(3):  # warm: the first allocations fault in whatever the heap has to grow by
    torch.empty(48 * 2 ** 20 // 4).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # 48 MiB each, past glibc's largest mmap threshold (32 MiB)
    torch.empty(48 * 2 ** 20 // 4).fill_(1.0)
print(set_)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_cpu_timings_keep_freed_host_memory():
    """adapterfuse-bench on a CPU keeps freed host memory: a large output is then not mapped and faulted in afresh on
    every call (that page faulting was most of the CPU timings, and their outliers). In a subprocess: mallopt is
    process-wide."""
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        what, faults = out.stdout.strip().splitlines()[-2:]
        return what, int(faults)

    what, faults_kept = run("keep")
    _, faults_default = run("default")
    assert "M_MMAP_MAX=0" in what
    # by default each of the 10 tensors is faulted in afresh (12288 faults each with 4 KiB pages, fewer with huge
    # pages); kept, the heap may still grow once more after the warm-up (a small allocation can split the freed
    # block: seen in one environment, one tensor's faults), but not per call
    assert faults_kept <= faults_default // 5
    assert faults_kept <= 2 * 48 * 2 ** 20 // 4096
