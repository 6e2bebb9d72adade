"""Compile every Triton kernel of adapterfuse for real GPUs without one (run by test_triton_compile.py in a
subprocess, because the test session runs Triton under the interpreter), with the launch configuration the
backend uses (triton_adapter._config, triton_linear_adapter.config), and report what ptxas says about each: registers, spill bytes and the
shared memory Triton allocates. Prints one JSON line per kernel and exits non-zero on the first compile error.

Besides the flags of KERNELS (every option on), each kernel is compiled in `--variants N` other flag combinations,
drawn with a seed fixed per case over the flags a launch sets either way (the backend picks them per call from the
arguments given and the gradients needed: bias or none, scale kind, skip kind, activation, which gradients, the
bank's BLOCK_G, LayerNorm and dropout alone or together). ptxas allocates registers per combination, and switching
features off can make a kernel spill that is spill-free with all of them on: a recording of every launch of the
test suite found bwd_rows fp32 r = 64 spilling 324 bytes without biases, and the Linear + adapter fp32 r = 16
spilling in 20 of its 23 recorded combinations, while the all-on compiles of this gate were clean.
Usage: python tests/_triton_aot.py [--variants N] [--shard I/N]"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adapterfuse.ops import triton_adapter as ta  # noqa: E402
from adapterfuse.ops import triton_linear_adapter as tla  # noqa: E402

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREC = {"bf16": "", "fp16": "", "fp32": "ieee"}
SCALARS = {"S": "*fp32", "s_value": "fp32", "G": "*fp32", "H": "*fp32", "DH": "*fp32", "DGR": "*fp32", "PR": "*fp32",
           "PQ": "*fp32", "PWD": "*fp32", "tokens": "i32", "M": "i32", "D": "i32", "R": "i32", "rows_per_split": "i32",
           "stride_xm": "i64", "stride_sm": "i64", "stride_ym": "i64", "stride_dym": "i64", "stride_dxm": "i64",
           "ORDER": "*i64", "BLK_END": "*i32", "SEG_START": "*i64", "SEG_LEN": "*i64", "NG": "i32", "s_stride": "i32",
           "K": "i32", "stride_im": "i64", "stride_rm": "i64", "STATS": "*fp32", "C": "*fp32", "ln_eps": "fp32",
           "seed": "i64", "drop_thr": "i32", "keep_scale": "fp32", "stride_wud": "i32", "stride_wur": "i32"}
#: opt-in shared memory per block: A100 (sm_80), H100 / H200 (sm_90)
SMEM_LIMIT = {80: 166912, 90: 232448}
# every dtype x every padded rank on sm_90; every rank in bf16 and the fp32 extremes on sm_80
CASES = ([(dt, r, 90) for dt in ("bf16", "fp16", "fp32") for r in (16, 32, 64, 128, 256)]
         + [("bf16", r, 80) for r in (16, 32, 64, 128, 256)] + [("fp32", 16, 80), ("fp32", 256, 80)])
# name: (kernel, its _config key, constexpr flags); the weight-gradient kernel in both variants it launches as
# (the LayerNorm / dropout arguments are None when off, as triton_adapter._ln_dropout_args passes them)
_OFF = dict(LN=False, DROP=False, STATS=None, C=None, ln_eps=None, seed=None, drop_thr=None, keep_scale=None)
_ONE = dict(_OFF, BANK=False, BLOCK_G=1, ORDER=None, BLK_END=None, SEG_START=None, SEG_LEN=None, NG=1)
_BANK = dict(_OFF, BANK=True, BLOCK_G=128)  # the adapter bank's variants (up to 127 adapters in one BLOCK_G search)
# the adapter_ln_dropout variants (input LayerNorm and dropout both on)
_LN_DROP = dict(BANK=False, BLOCK_G=1, ORDER=None, BLK_END=None, SEG_START=None, SEG_LEN=None, NG=1, LN=True, DROP=True)
KERNELS = {
    "fwd": (lambda: ta.adapter_fwd, "fwd", dict(HAS_BDN=True, HAS_BUP=True, SCALE_MODE=2, HAS_G=True, SKIP_MODE=1)),
    "bwd_rows": (lambda: ta.adapter_bwd_rows, "bwd_rows", dict(HAS_BUP=True, SCALE_MODE=2, HAS_G=True, SKIP_IS_X=True,
                                                              NEED_DX=True, NEED_DH=True, NEED_DG=True,
                                                              HAS_BDN=True)),
    "bwd_cols_rq": (lambda: ta.adapter_bwd_cols, "bwd_cols", dict(HAS_G=True, NEED_R=True, NEED_Q=True, NEED_WD=False)),
    "bwd_cols_wd": (lambda: ta.adapter_bwd_cols, "bwd_cols", dict(HAS_G=True, NEED_R=False, NEED_Q=False, NEED_WD=True)),
}
KERNELS = {**{k: (f, c, dict(fl, **_ONE)) for k, (f, c, fl) in KERNELS.items()},
           **{k + "_bank": (f, c, dict(fl, **_BANK)) for k, (f, c, fl) in KERNELS.items()},
           **{k + "_ln_drop": (f, c, dict(fl, **_LN_DROP)) for k, (f, c, fl) in KERNELS.items()},
           # the Linear + adapter kernel (triton_linear_adapter.py) in its training variant (writes t and h) and
           # its inference variant (t staged in y)
           "linear_fwd": (lambda: tla.linear_adapter_fwd, "linear", dict(
               HAS_BIAS=True, HAS_BDN=True, HAS_BUP=True, SCALE_MODE=2, HAS_RES=True, BEFORE=True, SAVE=True)),
           "linear_fwd_infer": (lambda: tla.linear_adapter_fwd, "linear", dict(
               HAS_BIAS=True, HAS_BDN=True, HAS_BUP=True, SCALE_MODE=2, HAS_RES=True, BEFORE=False, SAVE=False)),
           # its LayerNorm variant (BERT's output block, inference): t = LN(z + residual)
           "linear_fwd_ln": (lambda: tla.linear_adapter_fwd, "linear", dict(
               HAS_BIAS=True, HAS_BDN=True, HAS_BUP=True, SCALE_MODE=2, HAS_RES=True, BEFORE=True, SAVE=False,
               LN=True, HAS_LNW=True, HAS_LNB=True))}
for _name in ("linear_fwd", "linear_fwd_infer"):  # (the LayerNorm arguments are None when off)
    KERNELS[_name][2].update(LN=False, HAS_LNW=False, HAS_LNB=False, LNW=None, LNB=None, C=None, ln_eps=None)


def ptxas_report(ptx: str, cap: int) -> dict:
    """Registers and spill bytes of the PTX, from the ptxas Triton itself uses for this architecture."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(cap).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


# flags a launch sets either way, and their values
CHOICES = {"SCALE_MODE": (0, 1, 2), "SKIP_MODE": (0, 1, 2), "ACT": (0, 1, 2, 3, 4), "BLOCK_G": (2, 8, 32, 128)}
# flags that name the entry of KERNELS (and its launch table), not the call: never varied
FIXED = {"BANK", "LN", "DROP", "NEED_WD", "HAS_LNW", "HAS_LNB"}
_LN_ARGS = dict(STATS=None, C=None, ln_eps=None)
_DROP_ARGS = dict(seed=None, drop_thr=None, keep_scale=None)


def variants(kernel: str, n: int, seed: str) -> list:
    """n flag combinations of `kernel` besides its KERNELS entry, drawn with a seed fixed by `seed`: each flag a
    launch of that kernel may set either way takes a random value (the variant-defining ones stay)."""
    flags = KERNELS[kernel][2]
    fixed = set(FIXED)
    if kernel.startswith("bwd_cols_wd"):
        fixed |= {"NEED_R", "NEED_Q"}  # (the weight-gradient launch: its own, see triton_adapter._bwd_impl)
    if kernel == "linear_fwd_ln":
        fixed |= {"SAVE", "BEFORE"}  # (inference only, residual before: triton_linear_adapter refuses the rest)
    if not flags.get("BANK", True):
        fixed.add("BLOCK_G")
    free = {k: CHOICES.get(k, (False, True)) for k, v in flags.items()
            if k not in fixed and (isinstance(v, bool) or k in CHOICES)}
    free["ACT"] = CHOICES["ACT"]  # (not a KERNELS flag: compile_one's act, which a variant's ACT replaces)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        v = {k: rng.choice(c) for k, c in free.items()}
        if kernel.endswith("_ln_drop"):  # LayerNorm alone, dropout alone, or both (the entry: both)
            ln, drop = rng.choice(((True, True), (True, False), (False, True)))
            if kernel.startswith("bwd_cols_rq"):
                ln = False  # (the R / q launch never normalises: LN = ln and NEED_WD)
            v.update(LN=ln, DROP=drop, **({} if ln else _LN_ARGS), **({} if drop else _DROP_ARGS))
        if kernel == "linear_fwd_ln":
            v.update(HAS_LNW=rng.random() < 0.5, HAS_LNB=rng.random() < 0.5)
        out.append(v)
    return out


def compile_one(kernel, dtype, r, cap, act, override=None):
    get_fn, key, flags = KERNELS[kernel]
    flags = dict(flags, **(override or {}))
    act = flags.pop("ACT", act)
    fn = get_fn()
    if key == "linear":
        cfg = tla.config(r, DTYPES[dtype], ln=flags.get("LN", False))
        const = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
                     PREC=PREC[dtype], ACT=act)
    else:
        cfg = ta._config(key, r, DTYPES[dtype], bank=flags["BANK"], ln_drop=kernel.endswith("_ln_drop"))
        const = dict(flags, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.block_r, PREC=PREC[dtype], ACT=act)
    const = {k: v for k, v in const.items() if k in fn.arg_names}  # (e.g. C is the forward's and rows kernel's)
    sig = {n: "constexpr" if n in const else SCALARS.get(n, PTR[dtype]) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert compiled.asm.get("cubin"), "no cubin"
    report = {"kernel": kernel, "dtype": dtype, "r": r, "sm": cap, "config": cfg._asdict(), "flags": override or {},
              "shared": compiled.metadata.shared, "shared_limit": SMEM_LIMIT[cap]}
    report.update(ptxas_report(compiled.asm["ptx"], cap))
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", type=int, default=0, help="flag combinations per case besides the all-on one")
    ap.add_argument("--shard", default="0/1", help="I/N: compile every N-th job from the I-th (parallel runs)")
    args = ap.parse_args()
    shard, shards = map(int, args.shard.split("/"))
    jobs = []
    for i, (dtype, r, cap) in enumerate(CASES):
        for kernel in KERNELS:
            if KERNELS[kernel][1] == "linear" and tla.refusal(r, DTYPES[dtype]) is not None:
                continue  # refused by the backend (fused_linear_adapter falls back / raises): nothing to compile
            if kernel.endswith("_ln_drop") and ta.ln_dropout_refusal(r, DTYPES[dtype]) is not None:
                continue  # likewise (fused_adapter with layer_norm / dropout)
            jobs.append((kernel, dtype, r, cap, (2, 4, 3)[i % 3], None))
            jobs += [(kernel, dtype, r, cap, 2, v) for v in variants(kernel, args.variants, f"{kernel} {dtype} {r} {cap}")]
    mine = jobs[shard::shards]
    for job in mine:
        print(json.dumps(compile_one(*job)), flush=True)
    print(f"all Triton kernels compiled: {len(mine)}")


if __name__ == "__main__":
    sys.exit(main())
