"""Printing, saving and plotting benchmark results."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Callable, List, Optional


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def text_table(rows: List[dict], columns) -> str:
    """A fixed-width table: columns = [(key, header, format spec incl. width, e.g. ">9.2f" or "13s")]."""
    def width(spec):
        return int(re.match(r"[<>^]?(\d+)", spec).group(1))
    head = " ".join(f"{h:>{width(f)}s}" if f[0] == ">" or f[-1] != "s" else f"{h:{width(f)}s}" for _, h, f in columns)
    lines = [head, "-" * len(head)]
    lines += [" ".join(format(r[k], f) for k, _, f in columns) for r in rows]
    return "\n".join(lines)


def op_table(rows: List[dict], copy_gbs: Optional[float]) -> str:
    head = f"{'shape':12s} {'r':>3s} {'dtype':9s} {'mode':5s} {'variant':13s} {'ms':>9s} {'GB/s':>8s} " \
           f"{'%copy':>6s} {'xeager':>7s} {'xcomp':>6s} {'xcmax':>6s} {'mem MB':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        gbs = r.get("gbs")
        pct = 100 * gbs / copy_gbs if gbs and copy_gbs else None
        fmt = lambda v, f: (f.format(v) if v is not None else "")  # noqa: E731
        lines.append(f"{r['shape']:12s} {r['r']:>3d} {r['dtype']:9s} {r['mode']:5s} {r['variant']:13s} "
                     f"{r['ms']:9.3f} {fmt(gbs, '{:8.1f}'):>8s} {fmt(pct, '{:6.1f}'):>6s} "
                     f"{fmt(r.get('speedup_vs_eager'), '{:7.2f}'):>7s} {fmt(r.get('speedup_vs_compile'), '{:6.2f}'):>6s} "
                     f"{fmt(r.get('speedup_vs_compile_max'), '{:6.2f}'):>6s} "
                     f"{fmt(r.get('peak_mem_mb'), '{:8.1f}'):>8s}")
    return "\n".join(lines)


def model_table(rows: List[dict]) -> str:
    head = f"{'model':20s} {'mode':5s} {'variant':14s} {'ms':>9s} {'trainable':>10s} {'mem MB':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = f"{r['peak_mem_mb']:8.1f}" if r.get("peak_mem_mb") is not None else ""
        lines.append(f"{r['model']:20s} {r['mode']:5s} {r['variant']:14s} {r['ms']:9.2f} "
                     f"{r['trainable_params']:10d} {mem:>8s}")
    return "\n".join(lines)


def save_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=False))
    return path


def plot(result: dict, path: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """Time per variant per case, and % of the measured copy bandwidth for the memory-bound variants."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    rows = result["op"]
    if not rows:
        return None
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    label = lambda r: f"{r['shape']} r{r['r']} {short.get(r['dtype'], r['dtype'])} {r['mode']}"  # noqa: E731
    cases = []
    for r in rows:
        key = label(r)
        if key not in cases:
            cases.append(key)
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(cases)), 9))
    width = 0.8 / max(len(variants), 1)
    copy_gbs = result["meta"].get("copy_bandwidth_gbs")
    for i, v in enumerate(variants):
        ms, pct = [], []
        for c in cases:
            row = next((r for r in rows if r["variant"] == v and label(r) == c), None)
            ms.append(row["ms"] if row else 0)
            pct.append(100 * row["gbs"] / copy_gbs if row and row.get("gbs") and copy_gbs else 0)
        xs = [j + i * width for j in range(len(cases))]
        axes[0].bar(xs, ms, width, label=v)
        axes[1].bar(xs, pct, width, label=v)
    for ax, title in ((axes[0], "median time (ms, lower is better)"),
                      (axes[1], "% of measured copy bandwidth (ideal bytes / time)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"adapterfuse on {result['meta']['device']} (torch {result['meta']['torch']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
