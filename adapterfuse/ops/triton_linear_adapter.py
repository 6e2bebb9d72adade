"""Triton kernel of the Linear + adapter op (ops/linear_adapter.py; docs/design.md, Linear + adapter): a frozen
Linear's GEMM with the bottleneck adapter as its epilogue, one launch.

    z = inp @ weight^T + bias          inp [M, k], weight [d, k]
    t = z (+ residual, "before")       [M, d]  the adapter's input, rounded to the dtype as the unfused pair's z
    h = t @ w_down^T + b_down          [M, r]  fp32
    y = t + s (act(h) @ w_up^T + b_up) (+ residual, "after")

Design. h needs a whole row of t (a sum over all d columns) before u can start, so one program owns a block of
BLOCK_M rows and all d columns: pass 1 walks the output columns in BLOCK_N tiles; per tile it runs the GEMM's
K loop (fp32 accumulator [BLOCK_M, BLOCK_N]), adds bias (and the residual, "before"), rounds to t, writes the
t tile and accumulates h += t_tile @ w_down[:, tile]^T in registers ([BLOCK_M, BLOCK_R]). After the bias and
the activation, pass 2 walks the tiles again: u = a @ w_up[tile]^T, y = t + s u (+ residual, "after"), with
t read back from where pass 1 wrote it.

LayerNorm on t (LN, "before", inference: BERT's output block, t = LN(z + residual), y = t + s A(t)). Pass 1
stages the pre-LN rows (z + residual) as before and, in the same walk, gathers the row sums of zs = z - x0
(x0 = the row's first column, from the first tile: the shift keeps the variance free of cancellation) and
accumulates h on zs with the LayerNorm's weight folded into w_down (W' = w_down (.) gamma,
b' = b_down + w_down beta, c = W' 1; host): h = rstd (zs W'^T - mean(zs) c) + b' = LN(z) w_down^T + b_down
(docs/design.md, LayerNorm and dropout inside the adapter). Pass 2 normalises each staged tile as it reads it
back: t = ((z - x0) - mean(zs)) rstd gamma + beta, y = t + s u.

What memory sees. Reads: inp (once per column tile, as any GEMM re-reads its A operand per N tile; from L2),
the weight, the adapter weights (tiny), the residual once. Writes: y once. t: in inference pass 1 writes its
tile into y's own rows and pass 2 reads it back and overwrites it with y: the program's own [BLOCK_M, d] rows,
written and re-read moments apart, so from L2, not DRAM (96 KiB at BLOCK_M = 64, d = 768, bf16). The unfused
pair writes z to DRAM and reads it back (F.linear, then the adapter): that round trip is what this removes.
With gradients, t goes to a separate tensor (the one the backward needs, which the unfused pair saves as
well) and h is written ([M, r] fp32).

Why one program per row block. Parallelism is ceil(M / BLOCK_M) programs (197 for ViT-B/16 fc2 at M = 12608,
BLOCK_M = 64 on 132 SMs); the GEMM's N dimension is walked inside the program, so a small M (decode, batch 1)
leaves SMs idle: there the unfused pair's cuBLAS GEMM with split-K wins, and the benchmark says by how much
(issue 15's GPU session measures it). Tile sizes per rank and dtype are in _CONFIGS, held to zero register
spills by the compile gate (tests/test_triton_compile.py). Row and weight offsets are int64.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from .._checks import ACTIVATIONS
from ._common import alloc

try:
    import triton
    import triton.language as tl

    from .triton_lang import act, dot, scale_tile
except ImportError:  # reported by triton_adapter.unavailable_reason()
    triton = None

if triton is not None:

    @triton.jit
    def linear_adapter_fwd(
        INP, stride_im,      # inp     [M, k], column stride 1
        W,                   # weight  [d, k] contiguous (the frozen Linear)
        BIAS,                # bias    [d] (HAS_BIAS)
        WD, BDN,             # w_down  [r, d] contiguous; b_down [r]
        WU, BUP,             # w_up    [d, r] contiguous; b_up   [d]
        S, s_value,          # scale   [1] or [d] (SCALE_MODE 1 / 2), or the float s_value (0)
        RES, stride_rm,      # residual [M, d] (HAS_RES)
        Y, stride_ym,        # y       [M, d] out
        T,                   # t       [M, d] contiguous out (SAVE)
        H,                   # h       [M, r] fp32 out (SAVE)
        LNW, LNB, C, ln_eps,  # LN: gamma [d] (HAS_LNW), beta [d] (HAS_LNB), c = W' 1 [r] fp32 (WD / BDN: W', b')
        M, D, K, R,
        HAS_BIAS: tl.constexpr, HAS_BDN: tl.constexpr, HAS_BUP: tl.constexpr, SCALE_MODE: tl.constexpr,
        HAS_RES: tl.constexpr, BEFORE: tl.constexpr, SAVE: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
        LN: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        ncols = tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        dt = INP.dtype.element_ty
        # where t lives between the passes: T when the backward needs it, else y's own rows
        if SAVE:
            TS = T
            stride_ts = D
        else:
            TS = Y
            stride_ts = stride_ym

        # pass 1: t = inp @ weight^T + bias (+ residual) tile by tile; h += t_tile @ w_down[:, tile]^T
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if LN:
            x0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, D, BLOCK_N):
            cols = n0 + ncols
            c_mask = cols < D
            cols64 = cols.to(tl.int64)
            mask = row_mask[:, None] & c_mask[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + kk
                k_mask = ks < K
                a_in = tl.load(INP + rows64[:, None] * stride_im + ks[None, :],
                               mask=row_mask[:, None] & k_mask[None, :], other=0.0)     # [BM, BK]
                w = tl.load(W + cols64[:, None] * K + ks[None, :],
                            mask=c_mask[:, None] & k_mask[None, :], other=0.0)          # [BN, BK]
                acc = dot(a_in, tl.trans(w), acc, PREC)
            if HAS_BIAS:
                acc += tl.load(BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_RES and BEFORE:
                acc += tl.load(RES + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = acc.to(dt)
            tl.store(TS + rows64[:, None] * stride_ts + cols[None, :], t, mask=mask)
            wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
            if LN:  # the shift: column 0, met in the first tile (later tiles add 0)
                tf = t.to(tl.float32)
                x0 += tl.sum(tl.where(cols[None, :] == 0, tf, 0.0), axis=1)
                zs = tl.where(mask, tf - x0[:, None], 0.0)
                s1 += tl.sum(zs, axis=1)
                s2 += tl.sum(zs * zs, axis=1)
                h = dot(zs.to(dt), tl.trans(wd), h, PREC)
            else:
                h = dot(t, tl.trans(wd), h, PREC)                                        # [BM, BR]
        if LN:
            mean_s = s1 / D
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean_s * mean_s, 0.0) + ln_eps)
            h = (h - mean_s[:, None] * tl.load(C + rr, mask=r_mask, other=0.0)[None, :]) * rstd[:, None]
        if HAS_BDN:
            h += tl.load(BDN + rr, mask=r_mask, other=0.0).to(tl.float32)[None, :]
        if SAVE:
            tl.store(H + rows64[:, None] * R + rr[None, :], h, mask=row_mask[:, None] & r_mask[None, :])
        # padded columns (rr >= R) exactly 0 (an inf in t meets zero-padded w_down rows there: inf * 0 = NaN)
        a = tl.where(r_mask[None, :], act(h, ACT), 0.0).to(dt)
        tl.debug_barrier()  # pass 2 reads t tiles that other threads of this program wrote in pass 1

        # pass 2: y = t + s (a @ w_up[tile]^T + b_up) (+ residual)
        for n0 in range(0, D, BLOCK_N):
            cols = n0 + ncols
            c_mask = cols < D
            mask = row_mask[:, None] & c_mask[None, :]
            wu = tl.load(WU + cols[:, None] * R + rr[None, :], mask=c_mask[:, None] & r_mask[None, :], other=0.0)
            u = dot(a, tl.trans(wu), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PREC)
            if HAS_BUP:
                u += tl.load(BUP + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            s = scale_tile(S, s_value, cols, c_mask, SCALE_MODE, BLOCK_N)
            y = tl.load(TS + rows64[:, None] * stride_ts + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if LN:  # the staged z + residual, normalised: t = LN(z + residual), rounded as torch's LayerNorm's output
                y = ((y - x0[:, None]) - mean_s[:, None]) * rstd[:, None]
                if HAS_LNW:
                    y *= tl.load(LNW + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
                if HAS_LNB:
                    y += tl.load(LNB + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
                y = y.to(dt).to(tl.float32)
            y += u * s[None, :]
            if HAS_RES and not BEFORE:
                y += tl.load(RES + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(dt), mask=mask)


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per padded rank; chosen with the compile gate (zero spills,
# shared memory within an A100's), not yet timed on a GPU. The h accumulator ([BLOCK_M, BLOCK_R] fp32) and the
# adapter weight tiles grow with r, so BLOCK_M / BLOCK_N shrink there; with 4 warps fp16 / bf16 spilled hundreds
# of bytes at r <= 32. fp32 ("ieee" dots are FMA loops in registers) takes smaller tiles and at r = 256 spilled
# for every tile tried ((16, 16, 16) with 4, 8 or 16 warps, BLOCK_N 32 / 64): refused there (refusal()). fp32
# r = 16 takes 8 warps: with 4 it spilled 4-20 bytes in 20 of the 23 flag combinations the test suite launches
# (spill-free with every option on; the gate now compiles flag variants too).
_CONFIGS = {
    False: {16: (64, 64, 32, 8, 3), 32: (64, 64, 32, 8, 3), 64: (64, 64, 32, 8, 3), 128: (32, 32, 32, 8, 2),
            256: (16, 32, 32, 8, 2)},
    True: {16: (32, 32, 32, 8, 1), 32: (32, 32, 32, 4, 1), 64: (32, 32, 32, 8, 1), 128: (16, 16, 32, 8, 1),
           256: None},
}


# The LayerNorm variant (LN) carries the row sums and the shift as well: where the table above spilled with it
# (fp16 / bf16 at r <= 64: 12-208 bytes with BLOCK_N = 64, 3 stages; fp32 with 4 warps: 12 bytes at r = 16 on
# sm_90; fp32 32 x 32 with 8 warps: 4-28 bytes in flag variants) it takes a narrower tile / 8 warps (compile gate).
_LN_CONFIGS = {False: {16: (64, 32, 32, 8, 2), 32: (64, 32, 32, 8, 2), 64: (64, 32, 32, 8, 2)},
               True: {16: (16, 32, 32, 8, 1), 32: (16, 32, 32, 8, 1)}}


def _block_r(r: int) -> int:
    from .triton_adapter import _next_pow2

    return max(16, _next_pow2(r))


def refusal(r: int, dtype: torch.dtype) -> Optional[str]:
    """None when the kernel takes rank r in dtype; else why not (fused_linear_adapter: auto then runs the
    reference, a forced backend raises this)."""
    from .triton_adapter import MAX_RANK

    if r > MAX_RANK or _CONFIGS[dtype == torch.float32].get(_block_r(r)) is None:
        limit = max(k for k, v in _CONFIGS[dtype == torch.float32].items() if v is not None)
        return (f"backend='triton' runs the Linear + adapter kernel for r <= {limit} in {dtype} (got r = {r}); "
                "use backend='torch' (or 'auto', which falls back to it)")
    return None


def config(r: int, dtype: torch.dtype, ln: bool = False) -> Config:
    why = refusal(r, dtype)
    if why is not None:
        raise ValueError(f"adapterfuse: {why}")
    block_r = _block_r(r)
    fp32 = dtype == torch.float32
    bm, bn, bk, warps, stages = (_LN_CONFIGS.get(fp32, {}).get(block_r) if ln else None) or _CONFIGS[fp32][block_r]
    return Config(bm, bn, bk, block_r, warps, stages)


def _fwd_impl(inp, weight, bias, w_down, b_down, w_up, b_up, scale, scale_value, residual, residual_before,
              activation, save, ln_weight=None, ln_bias=None, ln_eps=-1.0):
    from .triton_adapter import _precision, triton_cdiv

    m, k = inp.shape
    d, r = weight.shape[0], w_down.shape[0]
    if d == 0 or k == 0:
        raise ValueError("adapterfuse: the Triton kernel needs d >= 1 and k >= 1 (fused_linear_adapter routes "
                         "those to the reference)")
    y = alloc((m, d), inp.dtype, inp.device)
    t = alloc((m, d), inp.dtype, inp.device) if save else inp.new_empty((0,))
    h = alloc((m, r), torch.float32, inp.device) if save else inp.new_empty((0,), dtype=torch.float32)
    if m == 0:
        return y, t, h
    ln = ln_eps >= 0
    cfg = config(r, inp.dtype, ln)
    if ln:  # the LayerNorm's affine folded into the down-projection (as functional._fold_layer_norm)
        if save or not residual_before:
            raise ValueError("adapterfuse: the Linear + adapter LayerNorm variant is inference-only, residual 'before'")
        from ..functional import _fold_layer_norm

        w_down, b_down = _fold_layer_norm(w_down, b_down, ln_weight, ln_bias)
    weight, w_down, w_up = weight.contiguous(), w_down.contiguous(), w_up.contiguous()
    dummy = w_down
    # off: None (constexpr), so the kernel without the LayerNorm compiles as before
    ln_args = (None if ln_weight is None else ln_weight.contiguous(), None if ln_bias is None else ln_bias.contiguous(),
               w_down.float().sum(1), float(ln_eps)) if ln else (None, None, None, None)
    with torch.cuda.device(inp.device) if inp.device.type == "cuda" else contextlib.nullcontext():
        linear_adapter_fwd[(triton_cdiv(m, cfg.block_m),)](
            inp, inp.stride(0), weight, dummy if bias is None else bias.contiguous(),
            w_down, dummy if b_down is None else b_down.contiguous(),
            w_up, dummy if b_up is None else b_up.contiguous(),
            dummy if scale is None else scale.contiguous(), scale_value,
            dummy if residual is None else residual, 0 if residual is None else residual.stride(0),
            y, y.stride(0), t if save else y, h if save else dummy,
            *ln_args,
            m, d, k, r,
            HAS_BIAS=bias is not None, HAS_BDN=b_down is not None, HAS_BUP=b_up is not None,
            SCALE_MODE=0 if scale is None else (1 if scale.numel() == 1 else 2), HAS_RES=residual is not None,
            BEFORE=bool(residual_before), SAVE=bool(save), ACT=ACTIVATIONS[activation], PREC=_precision(inp.dtype),
            LN=ln, HAS_LNW=ln and ln_weight is not None, HAS_LNB=ln and ln_bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y, t, h


def define(adapter_ops):
    """The Triton Linear + adapter op (adapterfuse::linear_adapter_fwd_triton); its backward runs the Triton
    adapter bwd op (adapter_ops) and torch GEMMs (ops/linear_adapter.py)."""
    from .linear_adapter import define_linear_adapter_ops

    return define_linear_adapter_ops("triton", _fwd_impl, adapter_ops, refusal=refusal)
