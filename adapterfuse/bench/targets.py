"""`python -m adapterfuse.bench.targets RESULT.json [--json]`: the performance targets (issue 15, docs/design.md
Benchmarks) read off one adapterfuse-bench results file, as figures: for each target, how many cases meet it
and the worst case with its value. A report, never a test: the exit status is 0 whatever the figures say (2 for
a file that cannot be read).

Targets (forward = mode "fwd", training = mode "train", per fused backend):
    copy roofline     forward: ideal bytes / time >= 85 % of the measured device-to-device copy bandwidth
    vs eager          forward >= 3x, training >= 2x the eager reference
    vs compile        forward >= 1.5x, training >= 1.3x torch.compile (default mode)
    vs max-autotune   forward >= 1.2x torch.compile(mode="max-autotune")
    cuda vs triton    fused_cuda within 10 % of fused_triton or faster (same case)
    model training    the Adapter+ fused training step no slower than PEFT LoRA's (same trainable-parameter count)
    model inference   Adapter+ fused inference at most 3 % over the frozen model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["evaluate", "targets_table", "main"]

FUSED_PREFIX = "fused_"


def _case(row: dict) -> str:
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    return f"{row['shape']} r={row['r']} {short.get(row['dtype'], row['dtype'])} {row['mode']}"


def _check(name: str, rows: List[Tuple[str, float]], goal: float, higher: bool, unit: str) -> dict:
    """One target over (case, value) pairs: met count and the worst case."""
    if not rows:
        return dict(target=name, goal=goal, higher=higher, unit=unit, cases=0, met=0, worst=None, worst_case=None)
    met = sum((v >= goal) if higher else (v <= goal) for _, v in rows)
    worst_case, worst = (min if higher else max)(rows, key=lambda cv: cv[1])
    return dict(target=name, goal=goal, higher=higher, unit=unit, cases=len(rows), met=met, worst=worst,
                worst_case=worst_case)


def evaluate(result: dict) -> List[dict]:
    """Every target's figures from a results dict (the JSON adapterfuse-bench writes)."""
    op = result.get("op", [])
    copy_gbs = result.get("meta", {}).get("copy_bandwidth_gbs")
    fused = sorted({r["variant"] for r in op if r["variant"].startswith(FUSED_PREFIX)})
    out = []

    def pairs(variant: str, mode: str, value: Callable[[dict], Optional[float]]):
        vals = [(_case(r), value(r)) for r in op if r["variant"] == variant and r["mode"] == mode]
        return [(c, v) for c, v in vals if v is not None]

    for v in fused:
        tag = v[len(FUSED_PREFIX):]
        if copy_gbs:
            out.append(_check(f"{tag} forward, % of copy bandwidth",
                              pairs(v, "fwd", lambda r: 100 * r["gbs"] / copy_gbs if r.get("gbs") else None),
                              85.0, True, "%"))
        for mode, key, goal, what in (("fwd", "speedup_vs_eager", 3.0, "forward vs eager"),
                                      ("train", "speedup_vs_eager", 2.0, "training vs eager"),
                                      ("fwd", "speedup_vs_compile", 1.5, "forward vs compile"),
                                      ("train", "speedup_vs_compile", 1.3, "training vs compile"),
                                      ("fwd", "speedup_vs_compile_max", 1.2, "forward vs max-autotune")):
            out.append(_check(f"{tag} {what}", pairs(v, mode, lambda r, k=key: r.get(k)), goal, True, "x"))
    if "fused_cuda" in fused and "fused_triton" in fused:
        triton_ms = {(_case(r)): r["ms"] for r in op if r["variant"] == "fused_triton"}
        ratio = [(_case(r), r["ms"] / triton_ms[_case(r)]) for r in op
                 if r["variant"] == "fused_cuda" and _case(r) in triton_ms]
        out.append(_check("cuda time / triton time", ratio, 1.10, False, "x"))
    models: Dict[Tuple[str, str], Dict[str, float]] = {}
    for r in result.get("model", []):
        models.setdefault((r["model"], r["mode"]), {})[r["variant"]] = r["ms"]
    train = [(m, v["adapter_fused"] / v["lora"]) for (m, mode), v in models.items()
             if mode == "train" and "adapter_fused" in v and "lora" in v]
    out.append(_check("model training step, Adapter+ fused / PEFT LoRA", train, 1.0, False, "x"))
    infer = [(m, 100 * (v["adapter_fused"] / v["frozen"] - 1)) for (m, mode), v in models.items()
             if mode == "infer" and "adapter_fused" in v and "frozen" in v]
    out.append(_check("model inference, Adapter+ fused over frozen", infer, 3.0, False, "%"))
    return out


def targets_table(checks: List[dict]) -> str:
    """A markdown table of the figures."""
    lines = ["| target | goal | met | worst case |", "| --- | --- | --- | --- |"]
    for c in checks:
        goal = f"{'>=' if c['higher'] else '<='} {c['goal']:g}{' %' if c['unit'] == '%' else 'x'}"
        if not c["cases"]:
            lines.append(f"| {c['target']} | {goal} | no cases | |")
            continue
        worst = f"{c['worst']:.2f}{' %' if c['unit'] == '%' else 'x'} ({c['worst_case']})"
        lines.append(f"| {c['target']} | {goal} | {c['met']} / {c['cases']} | {worst} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapterfuse.bench.targets", description=__doc__.split("\n\n")[0])
    ap.add_argument("result", type=Path, help="a JSON file written by adapterfuse-bench")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as e:
        print(f"adapterfuse.bench.targets: cannot read {args.result}: {e}", file=sys.stderr)
        return 2
    checks = evaluate(result)
    meta = result.get("meta", {})
    if args.json:
        print(json.dumps(checks, indent=1))
    else:
        print(f"targets on {meta.get('device')} (torch {meta.get('torch')}, triton {meta.get('triton')}, "
              f"{'complete run' if meta.get('complete', True) else 'incomplete run: ' + str(meta.get('skipped'))})")
        print(targets_table(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
