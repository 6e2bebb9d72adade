"""Op-level benchmark: one adapter (Adapter+ form: channel scale, bias, GELU, skip = x; drop-path in
training) on [M, d] tokens, against eager, torch.compile, LoRA on nn.Linear(d, d) and the frozen layer.

Variants (each where it can run on the device):
    fused_triton / fused_cuda / fused_cpu   adapterfuse.fused_adapter with that backend
    eager                                   adapterfuse.reference.adapter_reference
    compile                                 torch.compile(adapter_reference)
    compile_max                             torch.compile(adapter_reference, mode="max-autotune") (GPU default;
                                            its autotuning costs minutes, so it runs as a pass of its own)
    frozen                                  the frozen nn.Linear(d, d) alone
    lora / lora_merged                      PEFT's LoRA layer on that Linear at the same trainable-parameter
                                            count (rank r), unmerged and merged
Modes: "fwd" (inference, no grad) and "train" (forward + backward of every trainable input, x included).
The adapter variants cost nothing beyond themselves; for LoRA the overhead over "frozen" is reported too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import adapterfuse
from adapterfuse.reference import adapter_reference

from .timing import median_ms, peak_memory_mb, rotation_count

FUSED = ("fused_triton", "fused_cuda", "fused_cpu")


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    d: int


FULL_SHAPES = [Shape("vit_b16", 64 * 197, 768), Shape("vit_l16", 64 * 197, 1024),
               Shape("llama7b_8k", 8192, 4096), Shape("llama7b_32k", 32768, 4096)]
CPU_SHAPES = FULL_SHAPES[:2]
QUICK_SHAPES = FULL_SHAPES[:1]
FULL_RANKS, CPU_RANKS, QUICK_RANKS = (8, 16, 32, 64), (8, 32), (8,)


def peft_lora(base: nn.Linear, r: int) -> nn.Module:
    """PEFT's LoRA layer around base (frozen), or adapterfuse.LoRALinear when PEFT is not installed."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return adapterfuse.LoRALinear(base, r, alpha=r)
    try:
        layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=r, target_modules=["_"]), r=r, lora_alpha=r)
    except TypeError:  # older PEFT: no config argument
        layer = PeftLinear(base, "default", r=r, lora_alpha=r)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    return layer


def lora_backend_name() -> str:
    try:
        import peft

        return f"peft {peft.__version__}"
    except ImportError:
        return "adapterfuse.LoRALinear (peft not installed)"


def fused_variants(device: torch.device) -> Dict[str, str]:
    """variant name -> backend, for the fused backends that run on this device."""
    avail = adapterfuse.available_backends()
    if device.type == "cuda":
        return {f"fused_{b}": b for b in ("triton", "cuda") if b in avail}
    return {"fused_cpu": "cpu"} if "cpu" in avail else {}


def _adapter_inputs(shape: Shape, r: int, dtype, device, train: bool, gen: torch.Generator):
    def rnd(*s, std=1.0, grad=False):
        t = (torch.randn(*s, generator=gen, device="cpu") * std).to(device=device, dtype=dtype)
        return t.requires_grad_(grad and train)

    x = rnd(shape.M, shape.d, grad=True)
    params = dict(w_down=rnd(r, shape.d, std=shape.d ** -0.5, grad=True), b_down=rnd(r, std=0.1, grad=True),
                  w_up=rnd(shape.d, r, std=r ** -0.5, grad=True), b_up=rnd(shape.d, std=0.1, grad=True),
                  scale=rnd(shape.d, std=0.1, grad=True))
    return x, params


DEFAULT_VARIANTS = ("eager", "compile", "frozen", "lora", "lora_merged")  # after the fused ones


def run_op_benchmark(device: torch.device, *, shapes: List[Shape], ranks, dtypes, modes=("fwd", "train"),
                     variants: Optional[List[str]] = None, quick: bool = False,
                     log: Callable[[str], None] = print, deadline=None,
                     on_rows: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Rows of every (shape, dtype, r, mode) case; `on_rows` is handed each case's rows as soon as they exist.
    `deadline` (timing.Deadline): the cases not started before it passes are skipped and listed in
    deadline.skipped, and a variant that raises is listed in deadline.failed (without one, it raises)."""
    rows = []
    fused = fused_variants(device)
    want = variants or (list(fused) + list(DEFAULT_VARIANTS))
    for shape in shapes:
        for dtype in dtypes:
            for r in ranks:
                for mode in modes:
                    if deadline is not None and deadline.skip(f"op {shape.name} r={r} "
                                                              f"{str(dtype).replace('torch.', '')} {mode} {want}"):
                        continue
                    # a fresh compile per case: dynamo's per-function recompile limit (8) would otherwise
                    # silently send later shapes back to eager
                    torch._dynamo.reset()
                    compiled = {"compile": torch.compile(adapter_reference) if "compile" in want else None,
                                "compile_max": torch.compile(adapter_reference, mode="max-autotune")
                                if "compile_max" in want else None}
                    case_rows = _bench_case(device, shape, r, dtype, mode, want, fused, compiled, quick, log,
                                            None if deadline is None else deadline.failed)
                    rows += case_rows
                    if on_rows is not None:
                        on_rows(case_rows)
    return add_speedups(rows)


def add_speedups(rows: List[dict]) -> List[dict]:
    """Each fused / compiled row's speedup over eager, compile and compile_max, and each LoRA row's overhead over
    the frozen layer, from the rows of the same case (shape, r, dtype, mode), wherever in `rows` they are (the
    variants of one case may come from separate passes). In place; returns rows."""
    case = lambda r: (r["shape"], r["M"], r["d"], r["r"], r["dtype"], r["mode"])  # noqa: E731
    ms = {(case(r), r["variant"]): r["ms"] for r in rows}
    for row in rows:
        name, c = row["variant"], case(row)
        for base, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile"),
                          ("compile_max", "speedup_vs_compile_max")):
            ref = ms.get((c, base))
            if ref and name != base and (name in FUSED or (base == "eager" and name.startswith("compile"))):
                row[key] = ref / row["ms"]
        frozen = ms.get((c, "frozen"))
        if frozen and name.startswith("lora"):
            row["overhead_vs_frozen_ms"] = row["ms"] - frozen
    return rows


def _bench_case(device, shape, r, dtype, mode, want, fused, compiled, quick, log, failed=None) -> List[dict]:
    train = mode == "train"
    gen = torch.Generator().manual_seed(0)
    elem = torch.finfo(dtype).bits // 8
    n_sets = rotation_count(shape.M * shape.d * elem * (2 if train else 1), device, cap=4)
    sets = [_adapter_inputs(shape, r, dtype, device, train, gen) for _ in range(n_sets)]
    keep = 1.0 - 0.1  # Adapter+ drop-path 0.1 in training
    g = (torch.rand(shape.M, generator=gen) < keep).float().div_(keep).to(device) if train else None
    dy = torch.randn(shape.M, shape.d, generator=gen).to(device=device, dtype=dtype) if train else None
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % n_sets
        return sets[state["i"]]

    def adapter_fn(call):
        def run():
            x, p = next_set()
            with torch.set_grad_enabled(train):
                y = call(x, p["w_down"], p["b_down"], p["w_up"], p["b_up"], scale=p["scale"], activation="gelu",
                         skip=x, sample_scale=g)
                if train:
                    torch.autograd.grad(y, [x] + list(p.values()), dy)
            return None
        return run

    fns: Dict[str, Callable] = {}
    for name, backend in fused.items():
        if name in want:
            fns[name] = adapter_fn(lambda *a, _b=backend, **k: adapterfuse.fused_adapter(*a, backend=_b, **k))
    if "eager" in want:
        fns["eager"] = adapter_fn(adapter_reference)
    for name, fn in compiled.items():
        if fn is not None:
            fns[name] = adapter_fn(fn)

    lora = None
    if {"lora", "lora_merged"} & set(want):  # (a pass of compile_max alone builds no layers)
        lora = peft_lora(nn.Linear(shape.d, shape.d, device=device, dtype=dtype), r)
        with torch.no_grad():
            for n_, p_ in lora.named_parameters():
                if "lora_B" in n_:
                    p_.normal_(std=0.01)  # PEFT initialises B to zero; make the branch do real work

    def layer_fn(layer, merged=False):
        def run():
            x, _ = next_set()
            with torch.set_grad_enabled(train):
                y = layer(x)
                if train:
                    torch.autograd.grad(y, [x] + [q for q in layer.parameters() if q.requires_grad], dy)
        return run

    if "frozen" in want:
        base = nn.Linear(shape.d, shape.d, device=device, dtype=dtype)
        base.requires_grad_(False)
        fns["frozen"] = layer_fn(base)
    if "lora" in want:
        fns["lora"] = layer_fn(lora)

    results = {}
    for name, fn in fns.items():
        try:
            results[name] = (median_ms(fn, device, quick=quick), peak_memory_mb(fn, device))
        except Exception as e:  # noqa: BLE001  (recorded: one broken variant does not end a long GPU run)
            if failed is None:
                raise
            failed.append(f"op {shape.name} r={r} {str(dtype).replace('torch.', '')} {mode} {name}: "
                          f"{type(e).__name__}: {e}"[:400])
            log(f"  FAILED {failed[-1]}")
    if "lora_merged" in want and not train and hasattr(lora, "merge"):  # a merged LoRA does not train
        lora.merge()
        fn = layer_fn(lora)
        results["lora_merged"] = (median_ms(fn, device, quick=quick), peak_memory_mb(fn, device))

    # ideal bytes: read x + write y (fwd); + read dy, read x, write dx (bwd)
    ideal_bytes = (5 if train else 2) * shape.M * shape.d * elem
    rows = []
    for name, (ms, mem) in results.items():
        row = dict(shape=shape.name, M=shape.M, d=shape.d, r=r, dtype=str(dtype).replace("torch.", ""), mode=mode,
                   variant=name, ms=ms, peak_mem_mb=mem)
        if name in FUSED or name in ("eager", "compile", "compile_max"):
            row["gbs"] = ideal_bytes / (ms * 1e-3) / 1e9
        rows.append(row)
        log(f"  {shape.name:12s} r={r:<3d} {row['dtype']:9s} {mode:5s} {name:13s} {ms:9.3f} ms")
    return rows
