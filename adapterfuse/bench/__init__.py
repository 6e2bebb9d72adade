"""`adapterfuse-bench` / `python -m adapterfuse.bench`: what does an adapter cost, fused or not, against
LoRA? Runs the op-level and model-level benchmarks on the device present (CUDA if available, else CPU
with the CPU paths), prints tables, writes JSON and a PNG plot.

    adapterfuse-bench --quick            # minutes on a CPU machine, one shape
    adapterfuse-bench                    # docs/design.md, Benchmarks: every shape, r, dtype
    adapterfuse-bench --time-budget 520  # stop starting new cases after 520 s (the JSON lists what was skipped)
    adapterfuse-bench --out results/ --no-model --dtypes bfloat16 --ranks 8 32
    adapterfuse-bench --overhead-only    # us per call of the fused op vs eager at small M
    adapterfuse-bench --mixed-only       # many adapters in one batch: the adapter bank vs loops
    adapterfuse-bench --linear-only      # the adapter inside the frozen Linear vs the Linear alone
    adapterfuse-bench --ln-dropout-only  # the adapter's input LayerNorm and dropout inside the fused op
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import traceback
from pathlib import Path

import torch

__all__ = ["main"]


def _parse(argv):
    ap = argparse.ArgumentParser(prog="adapterfuse-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, r=8, one dtype; < 2 minutes on a CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for the JSON and PNG")
    ap.add_argument("--shapes", nargs="*", default=None, help="vit_b16 vit_l16 llama7b_8k llama7b_32k")
    ap.add_argument("--ranks", nargs="*", type=int, default=None)
    ap.add_argument("--dtypes", nargs="*", default=None, help="bfloat16 float16 float32")
    ap.add_argument("--modes", nargs="*", default=["fwd", "train"], choices=["fwd", "train"])
    ap.add_argument("--variants", nargs="*", default=None, help="restrict op-level variants")
    ap.add_argument("--no-model", action="store_true", help="skip the model-level benchmark")
    ap.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead section")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the per-call overhead section (us per call vs M, fused vs eager)")
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed-batch (adapter bank) section")
    ap.add_argument("--mixed-only", action="store_true",
                    help="only the mixed-batch section: the adapter bank vs loops over adapters")
    ap.add_argument("--no-linear", action="store_true", help="skip the Linear + adapter section")
    ap.add_argument("--linear-only", action="store_true",
                    help="only the Linear + adapter section: fused_linear_adapter / fuse_for_inference vs the Linear")
    ap.add_argument("--no-ln-dropout", action="store_true", help="skip the LayerNorm / dropout section")
    ap.add_argument("--ln-dropout-only", action="store_true",
                    help="only the section of the adapter's input LayerNorm and dropout inside the fused op")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--default-malloc", action="store_true",
                    help="CPU: time with glibc's default malloc, which maps and faults in every large output "
                         "afresh (by default the run keeps freed host memory, as CUDA's caching allocator does)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="S",
                    help="stop starting new cases after S seconds (the JSON, rewritten after every step, lists "
                         "what was skipped): for runs inside a fixed time limit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import adapterfuse

    from . import model as model_bench
    from . import op as op_bench
    from . import linear as linear_bench
    from . import ln_dropout as ln_dropout_bench
    from . import mixed as mixed_bench
    from . import overhead as overhead_bench
    from .report import git_commit, model_table, op_table, plot, save_json, slug
    from .timing import Deadline, copy_bandwidth_gbs, device_name, keep_freed_host_memory

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("adapterfuse-bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    shapes = op_bench.QUICK_SHAPES if args.quick else (op_bench.FULL_SHAPES if cuda else op_bench.CPU_SHAPES)
    if args.shapes:
        known = {s.name: s for s in op_bench.FULL_SHAPES}
        unknown = [s for s in args.shapes if s not in known]
        if unknown:
            print(f"adapterfuse-bench: unknown shapes {unknown}; known: {list(known)}", file=sys.stderr)
            return 2
        shapes = [known[s] for s in args.shapes]
    ranks = args.ranks or (op_bench.QUICK_RANKS if args.quick else (op_bench.FULL_RANKS if cuda else op_bench.CPU_RANKS))
    compile_max = args.variants is None and cuda and not args.quick and not args.dtypes
    if args.dtypes:
        plan = [(shapes, [getattr(torch, d) for d in args.dtypes])]
    elif args.quick:
        plan = [(shapes, [torch.bfloat16 if cuda else torch.float32])]
    elif cuda:  # docs/design.md, Benchmarks: bf16 first on every shape; fp16 and fp32 on the first shape too
        plan = [(shapes, [torch.bfloat16]), (shapes[:1], [torch.float16, torch.float32])]
    else:
        plan = [(shapes, [torch.float32, torch.bfloat16])]

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    print(f"adapterfuse-bench on {name} ({device.type}); torch {torch.__version__}, triton {triton_version}; "
          f"backends {adapterfuse.available_backends()}")
    deadline = Deadline(args.time_budget)
    host_malloc = None if cuda or args.default_malloc else keep_freed_host_memory()
    if host_malloc:
        print(f"host memory: {host_malloc}")
    copy_gbs = copy_bandwidth_gbs(device, quick=args.quick)
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s")
    # the sections to run: the --X-only ones if any is given, else every one without --no-X
    only_flags = {"overhead": args.overhead_only, "mixed": args.mixed_only, "linear": args.linear_only,
                  "ln_dropout": args.ln_dropout_only}
    only = any(only_flags.values())
    run = {k for k, v in only_flags.items() if v} if only else \
        {k for k in only_flags if not getattr(args, "no_" + k)}
    stamp = _dt.datetime.now(_dt.timezone.utc)
    result = {
        "meta": {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
                 "adapterfuse": adapterfuse.__version__, "git_commit": git_commit(), "date": stamp.isoformat(),
                 "quick": args.quick, "copy_bandwidth_gbs": copy_gbs, "lora": op_bench.lora_backend_name(),
                 "backends": adapterfuse.available_backends(), "time_budget_s": args.time_budget,
                 "host_malloc": host_malloc or "default", "skipped": [],
                 "complete": False},
        "overhead": [], "mixed": [], "mixed_model": [], "linear_op": [], "linear_model": [], "ln_dropout": [],
        "op": [], "model": [],
    }
    base = args.out / f"adapterfuse-{slug(name)}-{stamp.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}"
    path = base.with_suffix(".json")

    def checkpoint():  # the JSON is rewritten after every step and op / model case: a run stopped from outside
        # keeps what it measured
        result["meta"]["skipped"] = list(deadline.skipped)
        result["meta"]["failed"] = list(deadline.failed)
        save_json(result, path)

    # Steps, most wanted first (a time budget cuts the tail): the op level in bf16 on every shape, the model
    # level, torch.compile(mode="max-autotune") on the op cases (GPU), the other dtypes, then the sections.
    steps = []
    op_variants = args.variants

    def keep(section):  # each case's rows into the result and the JSON as soon as they exist
        def on_rows(rows):
            result[section] += rows
            if section == "op":
                op_bench.add_speedups(result["op"])
            checkpoint()
        return on_rows

    def op_pass(plan_shapes, plan_dtypes, variants):
        print("op-level:" if variants != ["compile_max"] else "op-level, torch.compile mode='max-autotune':")
        op_bench.run_op_benchmark(device, shapes=plan_shapes, ranks=ranks, dtypes=plan_dtypes, modes=args.modes,
                                  variants=variants, quick=args.quick, deadline=deadline, on_rows=keep("op"))

    def model_pass():
        print("model-level:")
        model_bench.run_model_benchmark(device, quick=args.quick, deadline=deadline, on_rows=keep("model"))

    if not only:
        steps.append(("op", lambda: op_pass(*plan[0], op_variants)))
        if not args.no_model:
            steps.append(("model", model_pass))
        if compile_max:
            steps.append(("op compile_max", lambda: op_pass(*plan[0], ["compile_max"])))
        for extra in plan[1:]:
            steps.append(("op", lambda extra=extra: op_pass(*extra, op_variants)))

    def overhead_pass():
        print("per-call overhead (us per call, small shapes):")
        result["overhead"] = overhead_bench.run_overhead_benchmark(device, quick=args.quick)

    def mixed_pass():
        print("mixed batches (adapter bank vs loops over adapters, ms):")
        result["mixed"] = mixed_bench.run_mixed_benchmark(device, quick=args.quick)
        print("mixed batches through a model (AdapterHub BatchSplit, PEFT adapter_names, the bank; ms):")
        result["mixed_model"] = mixed_bench.run_mixed_model_benchmark(device, quick=args.quick)

    def linear_pass():
        print("the adapter inside the frozen Linear (inference, ms):")
        result["linear_op"] = linear_bench.run_linear_op_benchmark(device, quick=args.quick)
        result["linear_model"] = linear_bench.run_linear_model_benchmark(device, quick=args.quick)

    def ln_dropout_pass():
        print("the adapter's input LayerNorm and dropout (ms):")
        result["ln_dropout"] = ln_dropout_bench.run_ln_dropout_benchmark(device, quick=args.quick)

    for key, fn in (("overhead", overhead_pass), ("mixed", mixed_pass), ("linear", linear_pass),
                    ("ln_dropout", ln_dropout_pass)):
        if key in run:
            steps.append((key, fn))
    for label, fn in steps:
        if not deadline.skip(f"section {label}"):
            try:
                fn()
            except Exception as e:  # noqa: BLE001  (recorded; the next steps still run)
                deadline.failed.append(f"section {label}: {type(e).__name__}: {e}"[:400])
                traceback.print_exc()
        checkpoint()
    result["meta"]["complete"] = not deadline.skipped and not deadline.failed
    checkpoint()

    if result["overhead"]:
        print()
        print(overhead_bench.overhead_table(result["overhead"]))
    if result["mixed"]:
        print()
        print(mixed_bench.mixed_table(result["mixed"]))
    if result["mixed_model"]:
        print()
        print(mixed_bench.mixed_model_table(result["mixed_model"]))
    if result["linear_op"] or result["linear_model"]:
        print()
        print(linear_bench.linear_table(result["linear_op"], result["linear_model"]))
    if result["ln_dropout"]:
        print()
        print(ln_dropout_bench.ln_dropout_table(result["ln_dropout"]))
    if result["op"]:
        print()
        print(op_table(result["op"], copy_gbs))
    if result["model"]:
        print()
        print(model_table(result["model"]))
    for what in deadline.failed:
        print(f"FAILED {what}")
    if deadline.skipped:
        print(f"\ntime budget ({args.time_budget:.0f} s) spent: skipped {len(deadline.skipped)} steps / cases, e.g. "
              f"{deadline.skipped[:3]}")
    print(f"\nwrote {path}")
    if not args.no_plot:
        png = plot(result, base.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    if deadline.failed:
        return 1
    return 0
