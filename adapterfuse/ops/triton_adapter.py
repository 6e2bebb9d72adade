"""Triton backend of the fused adapter: forward and backward kernels, launch code, custom ops.

Math (docs/design.md, Math), x flattened to [M, d], w_down [r, d], w_up [d, r]:

    h = x @ w_down^T + b_down        [M, r]  fp32, the only activation saved for backward
    a = act(h)                       [M, r]
    u = a @ w_up^T + b_up            [M, d]  never written to memory
    y = skip + g[m] * s * u          [M, d]  g[m] = sample_scale[m // tokens_per_sample]

Forward (one kernel, grid = row blocks of BLOCK_M rows):
    phase 1 streams the row block of x once over d in BLOCK_D tiles and accumulates h in fp32
    registers ([BLOCK_M, BLOCK_R]); phase 2 walks d again, recomputes u tile by tile from a (held in
    registers) and w_up, applies bias, scale, sample scale and skip, and writes y. When skip is x the
    phase-2 read of the skip comes from x's row block, which phase 1 just streamed, so it is an L2
    hit: DRAM traffic is ~ read x once + write y once (+ read skip when skip is another tensor).

Backward, without ever recomputing u. With P = (dy * s) @ w_up ([M, r]; d_a = g * P):
    d_h = g * P * act'(h)        dx = d_h @ w_down (+ dy if skip is x)      d_b_down = sum_m d_h
    d_w_down = d_h^T @ x         R = (g * dy)^T @ a  ([d, r])              q = sum_m g * dy  ([d])
    d_w_up = s * R               d_b_up = s * q
    d_s[c] = sum_m dy g u = sum_k w_up[c, k] R[c, k] + b_up[c] q[c]       (u = a w_up^T + b_up expanded)
    d_g[b] = sum_{m in b} (a[m] . P[m] + (dy[m] * s) . b_up)               (likewise)
    Kernel 1 (row blocks): one pass over d accumulates P (and the (dy * s) . b_up row sums), so d_h is
      known for the row block; a second pass over d writes dx. Outputs: dx, d_h (fp32 [M, r], tiny)
      and the per-row d_g sums.
    Kernel 2 (grid = d tiles x row splits): each program owns a BLOCK_D slice of columns and a
      contiguous range of rows and accumulates R and q (reading dy and h), or d_w_down (reading d_h and
      x), for that slice in fp32 registers, then writes one partial per split. It runs as those two
      launches: the bytes read are the same as one launch doing both, and one accumulator per launch is
      what keeps it free of register spills on sm_80 at r >= 64 (the compile gate found both
      accumulators together spilling kilobytes there). A torch .sum(0) over the few splits is the second stage:
      deterministic, no float atomics. d_b_down, d_g and the [d]-sized finishing products above are
      torch ops on tiny tensors, also deterministic.

Block sizes: tl.dot needs every block dimension >= 16, so r is padded to BLOCK_R = max(16,
next_pow2(r)) with masked loads (padded h columns are act(0) = 0 for every activation and meet
zero-masked weights); r <= MAX_RANK = 256. BLOCK_M rows x BLOCK_D columns, warps and pipeline stages per
kernel, rank and dtype come from the table in `_config`: the compile gate (tests/test_triton_compile.py)
holds every entry to zero register spills and to the shared memory of an A100 / H100. Any d works
because the d loops mask their last tile.
Row offsets are computed in int64 (M * d may exceed 2^31).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch

from .._checks import ACTIVATIONS
from ..reference import dropout_threshold
from ._common import AdapterOps, alloc, define_adapter_ops, empty_grad
from .registry import rank_refusal

_INTERPRET = lambda: os.environ.get("TRITON_INTERPRET") == "1"  # noqa: E731


#: largest bottleneck r: BLOCK_R = 256 is the widest [BLOCK_M, BLOCK_R] tile whose shared memory fits an A100
#: and that compiles without register spills (tests/test_triton_compile.py checks both per rank and dtype);
#: fused_adapter refuses larger r on this backend (auto falls back to the reference).
MAX_RANK = 256
NAME = "triton"


def unavailable_reason(build: bool = True) -> Optional[str]:  # (nothing to build ahead: Triton JIT-compiles per call)
    if triton is None:
        return "triton is not installed (pip install triton)"
    if _INTERPRET():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


def runs_on(device_type: str) -> bool:
    """CUDA tensors, or CPU tensors when the interpreter is on (TRITON_INTERPRET=1)."""
    return device_type == "cuda" or (device_type == "cpu" and _INTERPRET())


def shape_refusal(r: int) -> Optional[str]:
    return rank_refusal(NAME, MAX_RANK, r)


def check_call(device_type: str, dtype: torch.dtype) -> None:
    """Refuse calls this backend cannot run (beyond device and dtype, which the dispatcher checks)."""
    if device_type == "cpu" and dtype == torch.bfloat16:
        raise TypeError("backend='triton' on CPU tensors runs under the Triton interpreter, which has no "
                        "bfloat16 arithmetic; use float16/float32 there, or backend='torch'/'cpu'")


# The kernels are module-level (Triton resolves the helpers they call, from triton_lang.py, through this
# module's globals) and exist only when triton imports; this module itself is imported lazily by adapterfuse.functional.
try:
    import triton
    import triton.language as tl

    from .triton_lang import (act, act_grad, block_rows, chunk_of, chunk_rows, dot, dropout_tile, row_scale,
                              scale_tile)
except ImportError:  # reported by unavailable_reason()
    triton = None

if triton is not None:

    @triton.jit(do_not_specialize=["seed"])
    def adapter_fwd(
        X, stride_xm,        # x       [M, d], column stride 1
        WD, BDN,             # w_down  [r, d] contiguous; b_down [r]
        WU, BUP,             # w_up    [d, r]; b_up   [d]
        stride_wud, stride_wur,  # w_up's element strides: (r, 1) contiguous, (1, d) AdapterBank's up-major bank
        S, s_value,          # scale   [1] or [d] (SCALE_MODE 1 / 2), or the float s_value (0)
        G, tokens,           # sample_scale [B]; row m uses G[m // tokens]
        SKIP, stride_sm,     # skip    [M, d] (SKIP_MODE 2; 1 means skip is x)
        Y, stride_ym,        # y       [M, d] out
        H,                   # h       [M, r] fp32 out
        ORDER, BLK_END, SEG_START, SEG_LEN, NG,  # adapter bank (BANK): rows grouped by adapter, see block_rows
        s_stride,            # adapter bank: elements between two adapters' scales (1 for [A], D for [A, d])
        STATS, C, ln_eps,    # LN: stats [M, 3] fp32 out (x0, mean - x0, rstd); C [r] fp32 = w_down @ 1 (row sums)
        seed, drop_thr, keep_scale,  # DROP: the mask of dropout_tile; keep_scale = 1 / (1 - p)
        M, D, R,
        HAS_BDN: tl.constexpr, HAS_BUP: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_G: tl.constexpr,
        SKIP_MODE: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, BANK: tl.constexpr, BLOCK_G: tl.constexpr,
        LN: tl.constexpr, DROP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # One adapter: rows pid * BLOCK_M ... Adapter bank: a block of one adapter's rows, gathered through
        # ORDER, with that adapter's weights (WD, WU, biases, scale offset by its index); rows without an
        # adapter (group 0) run with every weight masked to 0: h = 0, u = 0, y = skip.
        rows64, row_mask, grp = block_rows(tl.program_id(0), M, ORDER, BLK_END, SEG_START, SEG_LEN, NG, BANK,
                                           BLOCK_M, BLOCK_G)
        ad = tl.maximum(grp - 1, 0).to(tl.int64)
        WD += ad * R * D
        WU += ad * D * R
        BDN += ad * R
        BUP += ad * D
        S += ad * s_stride
        rows = rows64
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        w_mask = r_mask & (rr * 0 + grp > 0)  # (a vector compare: the interpreter refuses scalar-bool masks)
        dcols = tl.arange(0, BLOCK_D)
        dt = X.dtype.element_ty

        # phase 1: h = x @ w_down^T (+ b_down), fp32 accumulation over d tiles. LN (the input LayerNorm, its
        # affine already folded into w_down / b_down): the same single read of x also gathers the row sums of
        # xs = x - x0 (x0 = the row's first element: the shift keeps E[xs^2] - E[xs]^2 and the subtraction below
        # free of cancellation when |mean| >> std), and h = rstd (xs w_down^T - mean(xs) c) + b_down afterwards,
        # which is (x - mean) rstd w_down^T + b_down = LN(x) w_down^T + b_down exactly (c = w_down @ 1).
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if LN:
            x0 = tl.load(X + rows64 * stride_xm, mask=row_mask, other=0.0).to(tl.float32)
            s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dcols
            c_mask = cols < D
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                        mask=row_mask[:, None] & c_mask[None, :], other=0.0)            # [BM, BD]
            if LN:
                xs = tl.where(row_mask[:, None] & c_mask[None, :], x.to(tl.float32) - x0[:, None], 0.0)
                s1 += tl.sum(xs, axis=1)
                s2 += tl.sum(xs * xs, axis=1)
                x = xs.to(dt)
            wd = tl.load(WD + rr[:, None] * D + cols[None, :],
                         mask=w_mask[:, None] & c_mask[None, :], other=0.0)             # [BR, BD]
            h = dot(x, tl.trans(wd), h, PREC)
        if LN:
            mean_s = s1 / D
            rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean_s * mean_s, 0.0) + ln_eps)
            c = tl.load(C + rr, mask=r_mask, other=0.0)
            h = (h - mean_s[:, None] * c[None, :]) * rstd[:, None]
            # the shift and the shifted mean, not their rounded sum: the backward's x - x0 is exact where
            # |mean| >> std, (x - mean_fp32) would lose the bits a rounded mean lacks
            tl.store(STATS + rows64 * 3, x0, mask=row_mask)
            tl.store(STATS + rows64 * 3 + 1, mean_s, mask=row_mask)
            tl.store(STATS + rows64 * 3 + 2, rstd, mask=row_mask)
        if HAS_BDN:
            h += tl.load(BDN + rr, mask=w_mask, other=0.0).to(tl.float32)[None, :]
        # rows without an adapter (bank group 0): h = 0 exactly (an inf in x met the masked weights: inf * 0 = NaN)
        h = tl.where(w_mask[None, :], h, 0.0)
        tl.store(H + rows64[:, None] * R + rr[None, :], h, mask=row_mask[:, None] & r_mask[None, :])
        # padded columns (rr >= R) must be exactly 0: an inf in x meets the zero-padded w_down rows there,
        # inf * 0 = NaN, and a NaN column of a would spread into every column of u through the dot
        a = tl.where(r_mask[None, :], act(h, ACT), 0.0).to(dt)
        g = row_scale(G, tokens, rows, row_mask, HAS_G, BLOCK_M)

        # phase 2: u = a @ w_up^T tile by tile; y = skip + g * s * (u + b_up)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dcols
            c_mask = cols < D
            mask = row_mask[:, None] & c_mask[None, :]
            wu = tl.load(WU + cols[:, None] * stride_wud + rr[None, :] * stride_wur,
                         mask=c_mask[:, None] & w_mask[None, :], other=0.0)             # [BD, BR]
            u = dot(a, tl.trans(wu), tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), PREC)
            if HAS_BUP:
                u += tl.load(BUP + cols, mask=c_mask & (cols * 0 + grp > 0), other=0.0).to(tl.float32)[None, :]
            s = scale_tile(S, s_value, cols, c_mask, SCALE_MODE, BLOCK_D)
            # the adapter branch is exactly 0 on rows without an adapter: their u = 0 meets an inf scale (a float
            # scale, or adapter 0's, whose offset group 0 borrows) or an inf sample_scale, and 0 * inf = NaN
            y = tl.where(cols[None, :] * 0 + grp > 0, u * s[None, :] * g[:, None], 0.0)
            if DROP:
                y = dropout_tile(y, seed, rows64, d0, drop_thr, keep_scale, BLOCK_M, BLOCK_D)
            if SKIP_MODE == 1:
                y += tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            elif SKIP_MODE == 2:
                y += tl.load(SKIP + rows64[:, None] * stride_sm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(dt), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def adapter_bwd_rows(
        DY, stride_dym,      # dy     [M, d], column stride 1
        WD,                  # w_down [r, d] contiguous
        WU, BUP,             # w_up   [d, r]; b_up [d]
        stride_wud, stride_wur,  # w_up's element strides, as in adapter_fwd
        S, s_value,          # scale as in the forward
        G, tokens,           # sample_scale [B]
        H,                   # h      [M, r] fp32 (saved by the forward)
        DX, stride_dxm,      # dx     [M, d] out (NEED_DX)
        DH,                  # d_h    [M, r] fp32 out (NEED_DH)
        DGR,                 # [M] fp32 out: a . P + (dy * s) . b_up per row (NEED_DG)
        ORDER, BLK_END, SEG_START, SEG_LEN, NG,  # adapter bank (BANK): rows grouped by adapter, see block_rows
        s_stride,            # adapter bank: elements between two adapters' scales (1 for [A], D for [A, d])
        X, stride_xm,        # LN: x [M, d]
        STATS, C, BDN,       # LN: stats [M, 3] fp32 (x0, mean - x0, rstd), C [r] fp32 = w_down @ 1, b_down [r]
        seed, drop_thr, keep_scale,  # DROP: as in the forward
        M, D, R,
        HAS_BUP: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_G: tl.constexpr, SKIP_IS_X: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DH: tl.constexpr, NEED_DG: tl.constexpr,
        ACT: tl.constexpr, PREC: tl.constexpr, BANK: tl.constexpr, BLOCK_G: tl.constexpr,
        LN: tl.constexpr, DROP: tl.constexpr, HAS_BDN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # rows and weights as in adapter_fwd (one adapter, or one bank adapter's block; group 0 masked to 0:
        # P = 0, d_h = 0, d_g = 0, dx = dy when the skip was x, else 0)
        rows64, row_mask, grp = block_rows(tl.program_id(0), M, ORDER, BLK_END, SEG_START, SEG_LEN, NG, BANK,
                                           BLOCK_M, BLOCK_G)
        ad = tl.maximum(grp - 1, 0).to(tl.int64)
        WD += ad * R * D
        WU += ad * D * R
        BUP += ad * D
        S += ad * s_stride
        rows = rows64
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        w_mask = r_mask & (rr * 0 + grp > 0)  # (a vector compare: the interpreter refuses scalar-bool masks)
        dcols = tl.arange(0, BLOCK_D)
        dt = WD.dtype.element_ty

        # pass 1 over d: P = (dy * s) @ w_up; the (dy * s) . b_up row sums for d_g
        p = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dg_bias = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dcols
            c_mask = cols < D
            dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :],
                         mask=row_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            if DROP:  # the adapter branch's dy: keep / (1 - p) (the skip's dx below takes the raw dy)
                dy = dropout_tile(dy, seed, rows64, d0, drop_thr, keep_scale, BLOCK_M, BLOCK_D)
            # (rows without an adapter: sdy = 0 exactly, whatever dy and the borrowed scale hold, so P, d_h, d_g = 0)
            sdy = tl.where(cols[None, :] * 0 + grp > 0,
                           dy * scale_tile(S, s_value, cols, c_mask, SCALE_MODE, BLOCK_D)[None, :], 0.0)
            wu = tl.load(WU + cols[:, None] * stride_wud + rr[None, :] * stride_wur,
                         mask=c_mask[:, None] & w_mask[None, :], other=0.0)             # [BD, BR]
            p = dot(sdy.to(dt), wu, p, PREC)
            if NEED_DG and HAS_BUP:
                bu = tl.load(BUP + cols, mask=c_mask & (cols * 0 + grp > 0), other=0.0).to(tl.float32)
                dg_bias += tl.sum(sdy * bu[None, :], axis=1)
        h = tl.load(H + rows64[:, None] * R + rr[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        g = row_scale(G, tokens, rows, row_mask, HAS_G, BLOCK_M)
        # zero the padded columns: an inf in dy meets zero-padded w_up columns there (inf * 0 = NaN); and every
        # column of a row without an adapter (its P = 0 meets an inf sample_scale)
        d_h = tl.where(w_mask[None, :], p * g[:, None] * act_grad(h, ACT), 0.0)
        if NEED_DH:
            tl.store(DH + rows64[:, None] * R + rr[None, :], d_h, mask=row_mask[:, None] & r_mask[None, :])
        if NEED_DG:
            a = tl.where(r_mask[None, :], act(h, ACT), 0.0)
            tl.store(DGR + rows, tl.sum(a * tl.where(r_mask[None, :], p, 0.0), axis=1) + dg_bias, mask=row_mask)

        # pass 2 over d: dx = d_h @ w_down (+ dy when the skip was x). LN: with d_x^ = d_h @ w_down and
        # x^ = (x - mean) rstd, dx = rstd (d_x^ - mean_c(d_x^) - x^ mean_c(d_x^ x^)); both row means come from
        # r-sized products, no extra pass: mean_c(d_x^) = d_h . c / d and mean_c(d_x^ x^) = d_h . (x^ w_down^T) / d
        # = d_h . (h - b_down) / d (h, saved, is x^ w_down^T + b_down).
        if NEED_DX:
            if LN:
                c = tl.load(C + rr, mask=r_mask, other=0.0)
                hb = h
                if HAS_BDN:
                    hb = h - tl.load(BDN + rr, mask=r_mask, other=0.0).to(tl.float32)[None, :]
                k1 = tl.sum(d_h * c[None, :], axis=1) / D
                k2 = tl.sum(d_h * tl.where(r_mask[None, :], hb, 0.0), axis=1) / D
                x0 = tl.load(STATS + rows64 * 3, mask=row_mask, other=0.0)
                mean_s = tl.load(STATS + rows64 * 3 + 1, mask=row_mask, other=0.0)
                rstd = tl.load(STATS + rows64 * 3 + 2, mask=row_mask, other=0.0)
            d_h_lp = d_h.to(dt)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + dcols
                c_mask = cols < D
                mask = row_mask[:, None] & c_mask[None, :]
                wd = tl.load(WD + rr[:, None] * D + cols[None, :],
                             mask=w_mask[:, None] & c_mask[None, :], other=0.0)         # [BR, BD]
                dx = dot(d_h_lp, wd, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), PREC)
                if LN:
                    xv = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
                    xh = ((xv.to(tl.float32) - x0[:, None]) - mean_s[:, None]) * rstd[:, None]
                    dx = rstd[:, None] * (dx - k1[:, None] - xh * k2[:, None])
                if SKIP_IS_X:
                    dx += tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(dt), mask=mask)

    @triton.jit
    def cols_step(DY, stride_dym, X, stride_xm, G, tokens, H, DH, STATS, seed, drop_thr, keep_scale, rows64,
                  row_mask, d0, cols, c_mask, rr, r_mask, R, acc_r, acc_q, acc_wd, dt, HAS_G: tl.constexpr,
                  NEED_R: tl.constexpr, NEED_Q: tl.constexpr, NEED_WD: tl.constexpr, ACT: tl.constexpr,
                  PREC: tl.constexpr, LN: tl.constexpr, DROP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        """One BLOCK_M-row step of adapter_bwd_cols: the rows' contributions to R, q and d_w_down (DROP: from the
        adapter branch's dy, keep / (1 - p); LN: d_w_down from x^, as in adapter_bwd_rows)."""
        mask = row_mask[:, None] & c_mask[None, :]
        if NEED_R or NEED_Q:
            dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if DROP:
                dy = dropout_tile(dy, seed, rows64, d0, drop_thr, keep_scale, BLOCK_M, BLOCK_D)
            gdy = dy * row_scale(G, tokens, rows64, row_mask, HAS_G, BLOCK_M)[:, None]
            if NEED_R:
                h = tl.load(H + rows64[:, None] * R + rr[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
                acc_r = dot(tl.trans(gdy.to(dt)), act(h, ACT).to(dt), acc_r, PREC)   # [BD, BR]
            if NEED_Q:
                acc_q += tl.sum(gdy, axis=0)
        if NEED_WD:
            dh = tl.load(DH + rows64[:, None] * R + rr[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            if LN:
                x0 = tl.load(STATS + rows64 * 3, mask=row_mask, other=0.0)
                mean_s = tl.load(STATS + rows64 * 3 + 1, mask=row_mask, other=0.0)
                rstd = tl.load(STATS + rows64 * 3 + 2, mask=row_mask, other=0.0)
                x = (((x.to(tl.float32) - x0[:, None]) - mean_s[:, None]) * rstd[:, None]).to(dt)
            acc_wd = dot(tl.trans(dh.to(dt)), x, acc_wd, PREC)                        # [BR, BD]
        return acc_r, acc_q, acc_wd

    @triton.jit(do_not_specialize=["seed"])
    def adapter_bwd_cols(
        DY, stride_dym,      # dy     [M, d]
        X, stride_xm,        # x      [M, d]
        G, tokens,           # sample_scale [B]
        H, DH,               # h, d_h [M, r] fp32
        PR,                  # partial R = (g dy)^T a  [splits, d, r] fp32 out (NEED_R)
        PQ,                  # partial q = sum_m g dy  [splits, d]    fp32 out (NEED_Q)
        PWD,                 # partial d_w_down        [splits, r, d] fp32 out (NEED_WD)
        ORDER, BLK_END, SEG_START, SEG_LEN, NG,  # adapter bank (BANK): a split is a chunk of one adapter's rows
        STATS,               # LN: stats [M, 3] fp32 (x0, mean - x0, rstd)
        seed, drop_thr, keep_scale,  # DROP: as in the forward
        M, D, R, rows_per_split,
        HAS_G: tl.constexpr, NEED_R: tl.constexpr, NEED_Q: tl.constexpr, NEED_WD: tl.constexpr,
        ACT: tl.constexpr, PREC: tl.constexpr, BANK: tl.constexpr, BLOCK_G: tl.constexpr,
        LN: tl.constexpr, DROP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        dt = X.dtype.element_ty

        acc_r = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        acc_wd = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        acc_q = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if BANK:  # chunk pid_s of one adapter's rows (rows without an adapter feed no adapter's sums)
            start, n, grp = chunk_of(pid_s, BLK_END, SEG_START, SEG_LEN, NG, rows_per_split, BLOCK_G)
            for m0 in range(0, tl.where(grp > 0, n, 0), BLOCK_M):
                rows64, row_mask = chunk_rows(ORDER, start, n, m0, BLOCK_M)
                acc_r, acc_q, acc_wd = cols_step(DY, stride_dym, X, stride_xm, G, tokens, H, DH, STATS, seed,
                                                 drop_thr, keep_scale, rows64, row_mask, pid_d * BLOCK_D, cols,
                                                 c_mask, rr, r_mask, R, acc_r, acc_q, acc_wd, dt, HAS_G, NEED_R,
                                                 NEED_Q, NEED_WD, ACT, PREC, LN, DROP, BLOCK_M, BLOCK_D)
        else:  # rows pid_s * rows_per_split ... of the one adapter
            row_start = pid_s * rows_per_split
            row_end = tl.minimum(row_start + rows_per_split, M)
            for m0 in range(row_start, row_end, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_mask = rows < row_end
                acc_r, acc_q, acc_wd = cols_step(DY, stride_dym, X, stride_xm, G, tokens, H, DH, STATS, seed,
                                                 drop_thr, keep_scale, rows.to(tl.int64), row_mask, pid_d * BLOCK_D,
                                                 cols, c_mask, rr, r_mask, R, acc_r, acc_q, acc_wd, dt, HAS_G,
                                                 NEED_R, NEED_Q, NEED_WD, ACT, PREC, LN, DROP, BLOCK_M, BLOCK_D)

        base = pid_s.to(tl.int64) * D
        if NEED_R:
            tl.store(PR + (base + cols[:, None]) * R + rr[None, :], acc_r, mask=c_mask[:, None] & r_mask[None, :])
        if NEED_WD:
            tl.store(PWD + base * R + rr[:, None] * D + cols[None, :], acc_wd, mask=r_mask[:, None] & c_mask[None, :])
        if NEED_Q:
            tl.store(PQ + base + cols, acc_q, mask=c_mask)


if triton is not None:

    @triton.jit
    def bank_reduce(
        P,                   # partials [chunks, size] fp32 (adapter_bwd_cols with BANK), chunks grouped by adapter
        BLK_END,             # [NG] int32: inclusive running chunk count per group (group = adapter + 1)
        OUT,                 # [A, size] fp32 out: each adapter's sum over its chunks
        size,
        BLOCK: tl.constexpr,
    ):
        """Stage two of the bank's weight-gradient reduction: per adapter, its chunks' partials summed in chunk
        order (deterministic, no atomics); an adapter without rows gets exact zeros."""
        a = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        first = tl.load(BLK_END + a)      # chunks of group a + 1 start where group a's end
        end = tl.load(BLK_END + a + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        ptrs = P + first.to(tl.int64) * size + offs  # 64-bit: chunks x size may exceed 2^31
        for _ in range(first, end):
            acc += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += size
        tl.store(OUT + a * size + offs, acc, mask=mask)


# ----------------------------------------------------------------------------------------- launch


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Config(NamedTuple):
    block_m: int
    block_d: int
    block_r: int
    num_warps: int
    num_stages: int


# Launch configurations, (BLOCK_M, BLOCK_D, num_warps, num_stages) per kernel and padded rank BLOCK_R, chosen
# with the compile gate (tests/test_triton_compile.py: ptxas registers / spills, shared memory, sm_80 and
# sm_90, every option on and in drawn flag combinations) and not yet timed on a GPU. fp16/bf16: 8 warps share
# the fp32 accumulators ([BLOCK_M, BLOCK_R] and, in the weight-gradient kernel, [BLOCK_D, BLOCK_R] +
# [BLOCK_R, BLOCK_D]); with 4 warps bf16 r = 64 needed 255 registers and spilled hundreds of bytes. fp32 ("ieee"
# dots are FMA loops in registers, no tensor cores) needs smaller tiles and one pipeline stage to stay
# spill-free. Switching options off changes the allocation: with all options on the gate was clean, while a
# recording of the test suite's 892 distinct launches found bwd_rows fp32 r = 64 at 32 x 64 spilling 324 bytes
# without biases, so the gate also compiles flag variants and these entries are the neighbours that stayed
# spill-free over 9-11 drawn combinations (bwd_rows fp32 r = 64 / 128: 32 x 32 / 32 x 16; the weight-gradient
# kernel bf16 r = 64 on sm_80: 32 x 64). The GPU image has triton 3.6, whose allocation differs again: the fp32
# r = 256 row backward spills there at every tile tried (16 x 16 with 8 warps: 200 bytes; the 4-warp tiles that
# are spill-free there with all options on spill kilobytes in some combinations).
_LOW = {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (64, 64, 8, 2), 128: (32, 64, 8, 2), 256: (16, 64, 8, 2)}
_CONFIGS = {
    ("fwd", False): _LOW, ("bwd_rows", False): _LOW, ("bwd_cols", False): {**_LOW, 64: (32, 64, 8, 2)},
    ("fwd", True): {16: (64, 64, 8, 1), 32: (64, 32, 8, 1), 64: (64, 32, 8, 1), 128: (32, 32, 8, 1),
                    256: (16, 16, 8, 2)},
    ("bwd_rows", True): {16: (64, 64, 8, 1), 32: (32, 64, 8, 1), 64: (32, 32, 8, 1), 128: (32, 16, 8, 1),
                         256: (16, 16, 8, 1)},
    ("bwd_cols", True): {16: (16, 64, 8, 1), 32: (16, 32, 8, 1), 64: (16, 32, 8, 1), 128: (16, 32, 8, 1),
                         256: (16, 32, 8, 1)},
}


# The adapter bank's variants (BANK=True) carry the row table (int64 row ids gathered per block, the group's
# weight offsets) and a masked weight load: where the one-adapter tile sat at the register limit they spilled,
# so these entries use smaller tiles (compile gate, same rules). The fp32 r = 256 forward spills a few bytes in
# some flag combinations at every tile tried; 3 stages is clean on sm_90 and spills 8 bytes in a few on sm_80
# (the gate's KNOWN_SPILLS).
_BANK_CONFIGS = {
    ("fwd", False): {256: (16, 32, 8, 2)},
    ("fwd", True): {128: (16, 16, 8, 1), 256: (16, 16, 8, 3)},
    ("bwd_rows", False): {256: (16, 32, 8, 2)},
    ("bwd_rows", True): {32: (16, 32, 8, 1), 64: (16, 32, 8, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 1)},
    ("bwd_cols", True): {256: (16, 16, 4, 1)},
}


# The adapter_ln_dropout variants (LN and DROP on) hold the philox state of a [BLOCK_M, BLOCK_D] tile and, in the
# row-block backward, the LayerNorm's row terms besides the usual accumulators: where the plain tile spilled these
# entries use narrower tiles (compile gate, same rules; the weight-gradient kernel keeps its own table). fp32 at
# BLOCK_R = 256 spills in the backward at every tile down to 16 x 16, so that one case is refused
# (ln_dropout_refusal: auto runs the reference).
_LN_DROP_CONFIGS = {
    ("fwd", False): {256: (16, 32, 8, 2)},
    ("fwd", True): {16: (32, 32, 8, 1), 32: (64, 16, 8, 1), 64: (64, 16, 8, 1), 256: (16, 16, 8, 2)},
    ("bwd_rows", False): {32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 16, 8, 2)},
    ("bwd_rows", True): {16: (64, 32, 8, 1), 32: (32, 32, 8, 1), 64: (32, 32, 8, 1), 128: (16, 16, 8, 1)},
    ("bwd_cols", False): {128: (32, 32, 8, 2)},
    ("bwd_cols", True): {16: (16, 32, 8, 1), 128: (16, 16, 8, 1)},
}
#: largest r of the LayerNorm / dropout variant in fp32 (the other dtypes take MAX_RANK)
LN_DROPOUT_MAX_RANK_FP32 = 128


def ln_dropout_refusal(r: int, dtype: torch.dtype) -> Optional[str]:
    """None, or why fused_adapter(layer_norm=... / dropout=...) cannot run rank r in dtype on this backend."""
    if dtype == torch.float32 and r > LN_DROPOUT_MAX_RANK_FP32:
        return (f"backend='triton' runs the adapter's LayerNorm / dropout in float32 for r <= "
                f"{LN_DROPOUT_MAX_RANK_FP32} (larger r spills registers), got r = {r}; use float16 / bfloat16, "
                "backend='torch', or 'auto' (which falls back to it)")
    return None


def _config(kernel: str, r: int, dtype: torch.dtype, bank: bool = False, ln_drop: bool = False) -> Config:
    """The launch configuration of `kernel` ("fwd", "bwd_rows", "bwd_cols") for rank r in dtype, for one
    adapter, (bank) the adapter bank's variant or (ln_drop) the input-LayerNorm / dropout variant."""
    if r > MAX_RANK:
        raise ValueError(f"adapterfuse: the Triton kernels take r <= {MAX_RANK}, got r = {r}")
    block_r = max(16, _next_pow2(r))
    key = (kernel, dtype == torch.float32)
    table = _BANK_CONFIGS if bank else _LN_DROP_CONFIGS if ln_drop else {}
    entry = table.get(key, {}).get(block_r)
    bm, bd, warps, stages = entry or _CONFIGS[key][block_r]
    return Config(bm, bd, block_r, warps, stages)


def _launch(cfg: Config) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.block_r, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's matmul precision setting: 'highest' -> exact fp32 ('ieee')."""
    if dtype != torch.float32:
        return ""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(m: int, d: int, block_m: int, block_d: int, device: torch.device) -> int:
    """Row splits of the weight-gradient kernel: enough programs to fill the GPU (~4 per SM), never
    more than there are row blocks. Under the interpreter a few splits still exercise the reduction."""
    row_blocks = triton_cdiv(m, block_m)
    if device.type == "cuda":
        want = triton_cdiv(4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()),
                           triton_cdiv(d, block_d))
    else:
        want = 3
    return max(1, min(row_blocks, want))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Rows(NamedTuple):
    """How a launch finds its rows: one adapter (table None: row blocks in order) or an adapter bank (the
    grouping of ops/triton_lang.py chunk_of, built on the device with no host sync: an upper-bound grid)."""
    args: tuple  # ORDER, BLK_END, SEG_START, SEG_LEN, NG
    grid: int
    bank: bool
    block_g: int


class _Grouping(NamedTuple):
    """The adapter bank's rows grouped by adapter (group = id + 1; group 0 = rows without an adapter), computed
    once per call on the device (no host sync) and shared by every launch of the call."""
    order: torch.Tensor      # [M] int64: the rows, group by group (stable)
    seg_start: torch.Tensor  # [groups] int64: each group's first position in order
    seg_len: torch.Tensor    # [groups] int64: each group's row count
    groups: int


def _grouping(index: torch.Tensor, adapters: int, m: int, tokens_per_sample: int) -> _Grouping:
    """The rows of every adapter; index is [M] (one id per row) or [B] (one per sample of tokens_per_sample rows)."""
    groups = adapters + 1
    if index.shape[0] != m:
        index = index.repeat_interleave(max(1, tokens_per_sample))
    # the ids were checked before the op (fused_adapter_bank), except under torch.compile: an id outside
    # [-1, A) would leave its rows unwritten, so check on the device without a host sync
    torch._assert_async(((index >= -1) & (index < adapters)).all(),
                        "adapterfuse: adapter_index ids must be in [-1, A) (-1: no adapter)")
    key = index + 1
    seg_len = torch.bincount(key, minlength=groups)
    return _Grouping(torch.argsort(key, stable=True), torch.cumsum(seg_len, 0) - seg_len, seg_len, groups)


def _rows(grouping: Optional[_Grouping], m: int, chunk: int) -> _Rows:
    """How a launch taking chunks of `chunk` rows finds them: one adapter (grouping None), or the bank's grouping
    with the running chunk count per group; the grid ceil(m / chunk) + groups bounds the chunks."""
    if grouping is None:
        # None (a constexpr to Triton) and NG = 1: the one-adapter kernels compile exactly as without the table
        return _Rows((None, None, None, None, 1), triton_cdiv(m, chunk), False, 1)
    g = grouping
    blk_end = torch.cumsum(triton_cdiv_t(g.seg_len, chunk), 0).to(torch.int32)
    return _Rows((g.order, blk_end, g.seg_start, g.seg_len, g.groups), triton_cdiv(m, chunk) + g.groups, True,
                 _next_pow2(g.groups))


def triton_cdiv_t(t: torch.Tensor, b: int) -> torch.Tensor:
    return (t + (b - 1)) // b


def _scale_args(scale: Optional[torch.Tensor], bank: bool, d: int, dummy: torch.Tensor):
    """(S, SCALE_MODE, s_stride): float (0), one value per adapter (1; [1] or [A]), per channel (2; [d] or [A, d])."""
    if scale is None:
        return dummy, 0, 0
    per_channel = scale.dim() == 2 if bank else scale.numel() != 1
    return scale.contiguous(), 2 if per_channel else 1, (d if per_channel else 1) if bank else 0


class _LnDropout(NamedTuple):
    """The kernels' LN / DROP arguments: (STATS, C, ln_eps) and (seed, drop_thr, keep_scale), with flags."""
    ln: bool
    drop: bool
    ln_args: tuple
    drop_args: tuple


def _ln_dropout_args(ln_eps: float, dropout_p: float, seed, stats, w_down) -> _LnDropout:
    ln = ln_eps >= 0
    drop = dropout_p > 0
    # c = w_down @ 1 over the weights exactly as the kernel's dot reads them (x's dtype), summed in fp32
    # off: None (a constexpr to Triton), so the plain kernels compile exactly as without these arguments (with them
    # as unused runtime parameters ptxas spilled 4 bytes in one bank variant)
    ln_args = (stats, w_down.float().sum(1), float(ln_eps)) if ln else (None, None, None)
    drop_args = (int(seed.reshape(())), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)) if drop else \
        (None, None, None)
    return _LnDropout(ln, drop, ln_args, drop_args)


def _fwd_impl(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
              tokens_per_sample, activation, index=None):
    """One adapter ([r, d] / [d, r] weights), or an adapter bank ([A, r, d] / [A, d, r], index [M] or [B]) in one
    launch."""
    return _forward(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                    tokens_per_sample, activation, index)[:2]


def _ln_dropout_fwd_impl(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                         tokens_per_sample, activation, ln_eps, dropout_p, seed):
    """The adapter_ln_dropout forward: the same kernel with LN and / or DROP on; (y, h, stats)."""
    return _forward(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale,
                    tokens_per_sample, activation, None, ln_eps, dropout_p, seed)


def _w_up_layout(w_up):
    """w_up ([d, r], or a bank's [A, d, r]) as the kernels read it, with its element strides along d and r:
    AdapterBank's up-major bank ([A, r, d] memory seen as [A, d, r]: strides (1, d), adapters d r apart) as it is,
    anything else made contiguous (strides (r, 1))."""
    if w_up.dim() == 3 and w_up.shape[2] > 1:
        a, d, r = w_up.shape
        if w_up.stride(1) == 1 and w_up.stride(2) == d and (a == 1 or w_up.stride(0) == d * r):
            return w_up, (1, d)
    w_up = w_up.contiguous()
    return w_up, (w_up.shape[-1], 1)


def _forward(x, w_down, b_down, w_up, b_up, scale, scale_value, skip, skip_is_x, sample_scale, tokens_per_sample,
             activation, index, ln_eps=-1.0, dropout_p=0.0, seed=None):
    m, d = x.shape
    r = w_down.shape[-2]
    if d == 0:
        raise ValueError("adapterfuse: the Triton kernels need d >= 1 (fused_adapter routes d = 0 to the reference)")
    y = alloc((m, d), x.dtype, x.device)
    h = alloc((m, r), torch.float32, x.device)
    stats = alloc((m, 3) if ln_eps >= 0 else (0,), torch.float32, x.device)
    if m == 0:
        return y, h, stats
    cfg = _config("fwd", r, x.dtype, bank=index is not None, ln_drop=ln_eps >= 0 or dropout_p > 0)
    w_down = w_down.contiguous()
    w_up, wu_strides = _w_up_layout(w_up)
    dummy = w_down
    rows = _rows(None if index is None else _grouping(index, w_down.shape[0], m, tokens_per_sample), m, cfg.block_m)
    s_t, scale_mode, s_stride = _scale_args(scale, rows.bank, d, dummy)
    skip_mode = 1 if skip_is_x else (2 if skip is not None else 0)
    extra = _ln_dropout_args(ln_eps, dropout_p, seed, stats, w_down)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        adapter_fwd[(rows.grid,)](
            x, x.stride(0),
            w_down, dummy if b_down is None else b_down.contiguous(),
            w_up, dummy if b_up is None else b_up.contiguous(), *wu_strides,
            s_t, scale_value,
            dummy if sample_scale is None else sample_scale.contiguous(), max(1, tokens_per_sample),
            skip if skip is not None else x, skip.stride(0) if skip is not None else 0,
            y, y.stride(0),
            h,
            *rows.args, s_stride,
            *extra.ln_args, *extra.drop_args,
            m, d, r,
            HAS_BDN=b_down is not None, HAS_BUP=b_up is not None, SCALE_MODE=scale_mode,
            HAS_G=sample_scale is not None, SKIP_MODE=skip_mode, ACT=ACTIVATIONS[activation],
            PREC=_precision(x.dtype), BANK=rows.bank, BLOCK_G=rows.block_g, LN=extra.ln, DROP=extra.drop,
            **_launch(cfg),
        )
    return y, h, stats


def _finish_scale(rr, q, s_vec, w_up, b_up, scale, need_wu, need_bu, need_s, out):
    """d_w_up = s R, d_b_up = s q, d_s = w_up . R + b_up q (summed over channels where the scale is one value per
    adapter); for one adapter (R [d, r]) or a bank (R [A, d, r]): docs/design.md, Backward."""
    if need_wu:
        out[3] = (rr * s_vec.unsqueeze(-1)).to(w_up.dtype)
    if need_bu:
        out[4] = (q * s_vec).to(b_up.dtype)
    if need_s:
        ds = (w_up.float() * rr).sum(-1)
        if b_up is not None:
            ds = ds + b_up.float() * q
        if scale.numel() != ds.numel():
            ds = ds.sum(-1)
        out[5] = ds.reshape(scale.shape).to(scale.dtype)


def _group_sums(parts: torch.Tensor, blk_end: torch.Tensor, adapters: int) -> torch.Tensor:
    """[A, ...]: adapter a's sum of its chunks of parts ([chunks, ...]; group a + 1 of blk_end), in chunk order.
    Group 0 (rows without an adapter) is no adapter's."""
    size = parts[0].numel() if parts.shape[0] else 0
    out = torch.empty((adapters,) + tuple(parts.shape[1:]), dtype=torch.float32, device=parts.device)
    if size and adapters:
        block = 256
        bank_reduce[(adapters, triton_cdiv(size, block))](parts, blk_end, out, size, BLOCK=block)
    elif adapters:
        out.zero_()
    return out


def _ln_dropout_bwd_impl(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
                         activation, skip_is_x, needs, stats, seed, dropout_p):
    """The adapter_ln_dropout backward: the same kernels with LN (stats saved: [M, 3]) and / or DROP on."""
    return _bwd_impl(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
                     activation, skip_is_x, needs, None, 0.0 if stats.dim() == 2 else -1.0, dropout_p, seed, stats)


def _bwd_impl(dy, x, h, w_down, b_down, w_up, b_up, scale, scale_value, sample_scale, tokens_per_sample,
              activation, skip_is_x, needs, index=None, ln_eps=-1.0, dropout_p=0.0, seed=None, stats=None):
    need_x, need_wd, need_bd, need_wu, need_bu, need_s, need_g = needs
    need_bd = need_bd and b_down is not None
    need_bu = need_bu and b_up is not None
    need_s = need_s and scale is not None
    need_g = need_g and sample_scale is not None
    bank = index is not None
    m, d = x.shape
    r = w_down.shape[-2]
    adapters = w_down.shape[0] if bank else 1
    dev = x.device
    out = [empty_grad(x) for _ in range(7)]
    if m == 0:  # nothing to reduce: every gradient is zero
        args = (x, w_down, b_down, w_up, b_up, scale, sample_scale)
        return [torch.zeros_like(a) if n and a is not None else empty_grad(x) for n, a in zip(needs, args)]
    ln_drop = ln_eps >= 0 or dropout_p > 0
    rows_cfg = _config("bwd_rows", r, x.dtype, bank, ln_drop)
    cols_cfg = _config("bwd_cols", r, x.dtype, bank, ln_drop)
    w_down = w_down.contiguous()
    w_up, wu_strides = _w_up_layout(w_up)
    dummy = h
    tokens = max(1, tokens_per_sample)
    g_c = dummy if sample_scale is None else sample_scale.contiguous()
    s_t, scale_mode, s_stride = _scale_args(scale, bank, d, dummy)
    grouping = _grouping(index, adapters, m, tokens_per_sample) if bank else None  # once for every launch below
    extra = _ln_dropout_args(ln_eps, dropout_p, seed, stats, w_down)
    common = dict(HAS_G=sample_scale is not None, ACT=ACTIVATIONS[activation], PREC=_precision(x.dtype),
                  DROP=extra.drop)
    need_dh = need_wd or need_bd
    need_r = need_wu or need_s
    need_q = need_bu or (need_s and b_up is not None)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        dh = dummy
        if need_x or need_dh or need_g:
            dx = alloc((m, d), x.dtype, dev) if need_x else dummy
            dh = alloc((m, r), torch.float32, dev) if need_dh else dummy
            dgr = alloc((m,), torch.float32, dev) if need_g else dummy
            rows = _rows(grouping, m, rows_cfg.block_m)
            adapter_bwd_rows[(rows.grid,)](
                dy, dy.stride(0), w_down, w_up, dummy if b_up is None else b_up.contiguous(), *wu_strides,
                s_t, scale_value, g_c, tokens, h,
                dx, dx.stride(0) if need_x else 0, dh, dgr, *rows.args, s_stride,
                x, x.stride(0), extra.ln_args[0], extra.ln_args[1], dummy if b_down is None else b_down.contiguous(),
                *extra.drop_args, m, d, r,
                HAS_BUP=b_up is not None, SCALE_MODE=scale_mode, SKIP_IS_X=skip_is_x, NEED_DX=need_x,
                NEED_DH=need_dh, NEED_DG=need_g, BANK=rows.bank, BLOCK_G=rows.block_g, LN=extra.ln,
                HAS_BDN=b_down is not None, **common, **_launch(rows_cfg),
            )
            if need_x:
                out[0] = dx
            if need_bd:
                if bank:  # each adapter's rows of d_h, summed in order (rows without an adapter are dropped)
                    ends = torch.cumsum(grouping.seg_len, 0).to(torch.int32)  # (chunks of one row)
                    out[2] = _group_sums(dh.index_select(0, grouping.order), ends, adapters).to(b_down.dtype)
                else:
                    out[2] = dh.sum(0).to(b_down.dtype)
            if need_g:
                out[6] = dgr.view(-1, tokens).sum(1).to(sample_scale.dtype)
        if need_wd or need_r or need_q:
            bm, bd = cols_cfg.block_m, cols_cfg.block_d
            splits = _splits(m, d, bm, bd, dev)
            rows_per_split = triton_cdiv(triton_cdiv(m, bm), splits) * bm
            rows = _rows(grouping, m, rows_per_split)
            splits = rows.grid if bank else triton_cdiv(m, rows_per_split)
            pr = alloc((splits, d, r), torch.float32, dev) if need_r else dummy
            pq = alloc((splits, d), torch.float32, dev) if need_q else dummy
            pwd = alloc((splits, r, d), torch.float32, dev) if need_wd else dummy
            # two launches, one accumulator each (see the module docstring)
            for flags in (dict(NEED_R=need_r, NEED_Q=need_q, NEED_WD=False),
                          dict(NEED_R=False, NEED_Q=False, NEED_WD=need_wd)):
                if any(flags.values()):
                    adapter_bwd_cols[(triton_cdiv(d, bd), splits)](
                        dy, dy.stride(0), x, x.stride(0), g_c, tokens, h, dh, pr, pq, pwd, *rows.args,
                        extra.ln_args[0], *extra.drop_args, m, d, r, rows_per_split, BANK=rows.bank,
                        BLOCK_G=rows.block_g, LN=extra.ln and flags["NEED_WD"], **flags, **common,
                        **_launch(cols_cfg),
                    )
            if bank:  # stage two per adapter: its chunks' partials in order (group 0, rows without one, dropped)
                total = lambda p: _group_sums(p, rows.args[1], adapters)  # noqa: E731
            else:
                total = lambda p: p.sum(0)  # noqa: E731
            if need_wd:
                out[1] = total(pwd).to(w_down.dtype)
            # the [d]-sized products that undo the folding of the scale
            if scale is not None:
                s_vec = scale.float()
                s_vec = s_vec.reshape(-1, 1).expand(adapters, d) if bank and s_vec.dim() == 1 else \
                    s_vec.expand(d) if not bank else s_vec
            else:
                s_vec = torch.full((adapters, d) if bank else (d,), scale_value, dtype=torch.float32, device=dev)
            _finish_scale(total(pr) if need_r else None, total(pq) if need_q else None, s_vec, w_up, b_up, scale,
                          need_wu, need_bu, need_s, out)
    return out


# ---------------------------------------------------------------------------- torch.library ops


fwd_op, bwd_op, fused = define_adapter_ops(NAME, _fwd_impl, _bwd_impl)
#: the adapter bank: the same kernels, each row block one adapter's rows (docs/design.md, Adapter bank)
bank = define_adapter_ops(NAME, _fwd_impl, _bwd_impl, op="adapter_bank")
#: the adapter with its input LayerNorm and / or dropout: the same kernels with LN / DROP on
ln_dropout = define_adapter_ops(NAME, _ln_dropout_fwd_impl, _ln_dropout_bwd_impl, op="adapter_ln_dropout")
#: Linear + adapter (ops/triton_linear_adapter.py): the GEMM with the adapter as its epilogue; backward through
#: this backend's adapter bwd op
linear = None
if triton is not None:
    from .triton_linear_adapter import define as _define_linear

    linear = _define_linear(AdapterOps(fwd_op, bwd_op, fused))
