"""Compile every Triton kernel of adapterfuse for real GPUs without one (run by test_triton_compile.py in
a subprocess, because the test session runs Triton under the interpreter). Prints one line per kernel
and exits non-zero on the first compile error. Usage: python tests/_triton_aot.py"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adapterfuse.ops import triton_adapter as ta  # noqa: E402

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
PREC = {"bf16": "", "fp16": "", "fp32": "ieee"}
SCALARS = {"S": "*fp32", "s_value": "fp32", "G": "*fp32", "H": "*fp32", "DH": "*fp32", "DGR": "*fp32", "PR": "*fp32",
           "PQ": "*fp32", "PWD": "*fp32", "tokens": "i32", "M": "i32", "D": "i32", "R": "i32", "rows_per_split": "i32",
           "stride_xm": "i64", "stride_sm": "i64", "stride_ym": "i64", "stride_dym": "i64", "stride_dxm": "i64"}
# (dtype, r, compute capability): every dtype, small / medium / large padded r, A100 and H100
CASES = [("bf16", 8, 90), ("fp16", 64, 90), ("fp32", 200, 90), ("bf16", 200, 90), ("fp32", 8, 80),
         ("bf16", 64, 80), ("fp16", 130, 80)]


def compile_one(fn, dtype, const, cap):
    sig = {n: "constexpr" if n in const else SCALARS.get(n, PTR[dtype]) for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32))
    assert kernel.asm.get("cubin"), "no cubin"


def main():
    for i, (dtype, r, cap) in enumerate(CASES):
        bm, bd, br, _ = ta._blocks(r)
        blocks = dict(BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, PREC=PREC[dtype], ACT=i % 5)
        on = i % 2 == 0
        compile_one(ta.adapter_fwd, dtype, dict(HAS_BDN=on, HAS_BUP=not on, SCALE_MODE=i % 3, HAS_G=on,
                                                SKIP_MODE=i % 3, **blocks), cap)
        compile_one(ta.adapter_bwd_rows, dtype, dict(HAS_BUP=on, SCALE_MODE=(i + 1) % 3, HAS_G=not on, SKIP_IS_X=on,
                                                     NEED_DX=True, NEED_DH=True, NEED_DG=True, **blocks), cap)
        compile_one(ta.adapter_bwd_cols, dtype, dict(HAS_G=on, NEED_R=True, NEED_Q=True, NEED_WD=True, **blocks), cap)
        print(f"compiled fwd, bwd_rows, bwd_cols for {dtype} r={r} (BLOCK_R={br}) act={i % 5} sm_{cap}", flush=True)
    print("all Triton kernels compiled")


if __name__ == "__main__":
    sys.exit(main())
