"""One fused-adapter call for Nsight Compute (issue 15: where a target is missed, the profile figures that say
why: achieved bandwidth, occupancy, registers). Builds the case, warms up (Triton compiles, the extension loads),
then runs exactly one call between cudaProfilerStart / Stop, so `ncu --profile-from-start off` profiles only it:

    ncu --profile-from-start off --clock-control none --csv --page details \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        python3 tools/profile_kernels.py --shape vit_b16 --r 8 --dtype bfloat16 --backend triton --mode train

`bash tools/gpu_session.sh profile` runs the cases of the benchmark's shapes through it, each case's CSV after a
"# case ..." line in one file, and `python3 tools/profile_kernels.py --summarize FILE` prints per case and kernel
the figures the issue asks for. Without a GPU the call runs on the CPU (the profiler calls skipped), so the script
and the summary are tested (tests/test_tools.py).
"""
import argparse
import csv
import io
import sys

import torch

import adapterfuse
from adapterfuse.bench.op import FULL_SHAPES

SHAPES = {s.name: s for s in FULL_SHAPES}


#: (ncu details-page metric name, column header) of the summary
SUMMARY = [("Duration", "time"), ("DRAM Throughput", "DRAM %"), ("Memory Throughput", "mem"),
           ("Compute (SM) Throughput", "SM %"), ("Registers Per Thread", "regs"),
           ("Theoretical Occupancy", "occ theo %"), ("Achieved Occupancy", "occ %")]


def summarize(text: str) -> str:
    """Per case and kernel launch, the SUMMARY figures (with their units) from the CSV that `ncu --csv --page
    details` wrote after each "# case ..." line; lines that are not CSV (the program's own output) are skipped."""
    out, case, block = [], None, []

    def flush():
        if case is None or not block:
            return
        rows = list(csv.DictReader(io.StringIO("".join(block))))
        launches = {}
        for row in rows:
            key = (row.get("ID"), row.get("Kernel Name", "?"), row.get("Grid Size", "?"), row.get("Block Size", "?"))
            launches.setdefault(key, {})[row.get("Metric Name")] = (row.get("Metric Value"), row.get("Metric Unit"))
        out.append(case)
        for (_, kernel, grid, block_size), metrics in launches.items():
            figures = [f"grid {grid} x block {block_size}"]
            for name, head in SUMMARY:
                if name in metrics:
                    value, unit = metrics[name]
                    shown = "" if not unit or unit in ("%", "register/thread") else " " + unit
                    figures.append(f"{head} {value}{shown}")
            out.append(f"  {kernel[:60]}: " + ", ".join(figures))

    for line in text.splitlines(keepends=True):
        if line.startswith("# case"):
            flush()
            case, block = line.strip()[2:], []
        elif line.startswith('"'):  # ncu's CSV rows are quoted
            block.append(line)
    flush()
    return "\n".join(out)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summarize"]:
        with open(argv[1]) as f:
            print(summarize(f.read()))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="vit_b16", choices=sorted(SHAPES))
    ap.add_argument("--m", type=int, default=None, help="rows instead of the shape's")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--mode", default="fwd", choices=["fwd", "train"])
    ap.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda, dtype = device == "cuda", getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    m, d, r, train = args.m or shape.M, shape.d, args.r, args.mode == "train"
    gen = torch.Generator().manual_seed(0)

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=gen) * std).to(device=device, dtype=dtype).requires_grad_(train)

    x = rnd(m, d)
    w_down, b_down = rnd(r, d, std=d ** -0.5), rnd(r, std=0.1)
    w_up, b_up, scale = rnd(d, r, std=r ** -0.5), rnd(d, std=0.1), rnd(d, std=0.1)
    dy = torch.randn(m, d, generator=gen).to(device=device, dtype=dtype)
    inputs = [x, w_down, b_down, w_up, b_up, scale]

    def call():
        with torch.set_grad_enabled(train):
            y = adapterfuse.fused_adapter(x, w_down, b_down, w_up, b_up, scale=scale, activation="gelu", skip=x,
                                          backend=args.backend)
            if train:
                torch.autograd.grad(y, inputs, dy)

    for _ in range(3):  # compiles, loads, allocator warm
        call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled: {args.shape} M={m} d={d} r={r} {args.dtype} {args.backend} {args.mode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
