"""Kernel regression check: compare a new benchmark JSON with a committed baseline.

    python -m adapterfuse.bench.compare NEW.json BASELINE.json [--tolerance 0.10] [--absolute]

Exits 1 when, for an op-level case present in both files,
  * a fused variant is more than `tolerance` slower than in the baseline (only when both files come from
    the same device name). By default "slower" is measured relative to eager PyTorch in the same run
    (fused ms / eager ms against the baseline's ratio), which does not move when a shared machine is
    slower as a whole (a busy 2-core CI machine runs every variant 1.5-2x slower some hours); with
    --absolute the medians themselves are compared (a dedicated machine, e.g. a GPU session), or
  * a fused variant that was faster than eager in the baseline is no longer faster than eager
    (a same-run ratio, so it is checked whatever the device).
Cases only in one file are listed and ignored.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Tuple

KEY = ("shape", "M", "d", "r", "dtype", "mode")


def _index(rows):
    return {tuple(r[k] for k in KEY) + (r["variant"],): r for r in rows}


def compare(new: dict, base: dict, tolerance: float, absolute: bool = False) -> Tuple[List[str], List[str]]:
    """(failures, notes)"""
    failures, notes = [], []
    same_device = new["meta"].get("device") == base["meta"].get("device")
    if not same_device:
        notes.append(f"devices differ ({new['meta'].get('device')!r} vs baseline {base['meta'].get('device')!r}): "
                     "absolute times not compared, only each fused variant's lead over eager")
    n_idx, b_idx = _index(new["op"]), _index(base["op"])
    checked = 0
    for key, row in n_idx.items():
        variant = key[-1]
        if not variant.startswith("fused_"):
            continue
        case = ", ".join(f"{k}={v}" for k, v in zip(KEY, key[:-1])) + f", {variant}"
        old = b_idx.get(key)
        if old is None:
            notes.append(f"new case, no baseline: {case}")
            continue
        checked += 1
        eager_new, eager_old = n_idx.get(key[:-1] + ("eager",)), b_idx.get(key[:-1] + ("eager",))
        if same_device and not absolute and eager_new and eager_old:
            now, then = row["ms"] / eager_new["ms"], old["ms"] / eager_old["ms"]
            if now > then * (1 + tolerance):
                failures.append(f"slower relative to eager: {case}: {row['ms']:.3f} ms = {now:.3f} x eager "
                                f"vs baseline {then:.3f} x eager (+{100 * (now / then - 1):.0f}% > "
                                f"{100 * tolerance:.0f}%)")
        elif same_device and row["ms"] > old["ms"] * (1 + tolerance):
            failures.append(f"slower: {case}: {row['ms']:.3f} ms vs baseline {old['ms']:.3f} ms "
                            f"(+{100 * (row['ms'] / old['ms'] - 1):.0f}% > {100 * tolerance:.0f}%)")
        if eager_new and eager_old and old["ms"] < eager_old["ms"] and row["ms"] >= eager_new["ms"]:
            failures.append(f"lost its lead over eager: {case}: {row['ms']:.3f} ms vs eager {eager_new['ms']:.3f} ms "
                            f"(baseline {old['ms']:.3f} vs {eager_old['ms']:.3f})")
    for key in b_idx.keys() - n_idx.keys():
        if key[-1].startswith("fused_"):
            notes.append("baseline case not measured now: " + ", ".join(map(str, key)))
    notes.append(f"{checked} fused cases compared at tolerance {100 * tolerance:.0f}%")
    return failures, notes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("baseline", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed slowdown, 0.10 = 10%% (default)")
    ap.add_argument("--absolute", action="store_true",
                    help="compare median times themselves, not their ratio to eager in the same run")
    args = ap.parse_args(argv)
    failures, notes = compare(json.loads(args.new.read_text()), json.loads(args.baseline.read_text()), args.tolerance,
                              args.absolute)
    for n in notes:
        print("note:", n)
    for f in failures:
        print("REGRESSION:", f)
    print(f"benchmark compare: {len(failures)} regressions")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
