"""Is the fused CPU path worth having? On the ViT-B shape (d = 768, M = 64 * 197, r = 8 and 32, fp32),
time the C++ CPU backend against the eager reference and torch.compile(reference), forward and
forward + backward, side by side in one run, and print the ratios the C++ extension issue asks for
(>= 2x eager, not slower than compile). Not a test: it reports, it does not assert.

    python benchmarks/bench_cpu_path.py [--out benchmarks/results]
"""
import argparse
import datetime as dt
import json
from pathlib import Path

import torch

import adapterfuse
from adapterfuse.bench import op
from adapterfuse.bench.report import git_commit, slug
from adapterfuse.bench.timing import device_name, keep_freed_host_memory


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; the median of medians is kept")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time with glibc's default malloc (adapterfuse-bench --default-malloc)")
    args = ap.parse_args()
    host_malloc = None if args.default_malloc else keep_freed_host_memory()  # as adapterfuse-bench does on a CPU
    if "cpu" not in adapterfuse.available_backends():
        raise SystemExit(f"the cpu backend is unavailable: {adapterfuse.backend_status()['cpu']}")
    dev = torch.device("cpu")
    runs = []
    for _ in range(args.repeat):  # interleave repetitions so drift on a shared machine hits every variant
        runs.append(op.run_op_benchmark(dev, shapes=op.QUICK_SHAPES, ranks=(8, 32), dtypes=[torch.float32],
                                        variants=["fused_cpu", "eager", "compile"], log=lambda s: None))
    rows = []
    for i, row in enumerate(runs[0]):
        times = sorted(run[i]["ms"] for run in runs)
        rows.append(dict(row, ms=times[len(times) // 2], ms_all=times))
    print(f"CPU path on {device_name(dev)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"host memory: {host_malloc or 'default malloc'}")
    print(f"{'r':>3s} {'mode':5s} {'fused_cpu':>10s} {'eager':>9s} {'compile':>9s} {'x eager':>8s} {'x compile':>9s}")
    verdicts = []
    for r in (8, 32):
        for mode in ("fwd", "train"):
            t = {x["variant"]: x["ms"] for x in rows if x["r"] == r and x["mode"] == mode}
            ve, vc = t["eager"] / t["fused_cpu"], t["compile"] / t["fused_cpu"]
            ok = ve >= 2.0 and vc >= 1.0
            verdicts.append(ok)
            print(f"{r:>3d} {mode:5s} {t['fused_cpu']:10.2f} {t['eager']:9.2f} {t['compile']:9.2f} {ve:8.2f} {vc:9.2f}"
                  f"  {'meets' if ok else 'MISSES'} the >= 2x eager / >= 1x compile bar")
    out = args.out / f"cpu-path-{slug(device_name(dev))}{'-default-malloc' if args.default_malloc else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": {"device": device_name(dev), "torch": torch.__version__,
                                        "threads": torch.get_num_threads(), "git_commit": git_commit(),
                                        "date": dt.datetime.now(dt.timezone.utc).isoformat(), "repeat": args.repeat,
                                        "host_malloc": host_malloc or "default"},
                               "op": rows}, indent=1))
    print(f"wrote {out}; {sum(verdicts)}/{len(verdicts)} cases meet the bar")


if __name__ == "__main__":
    main()
