"""Triton building blocks shared by every adapterfuse kernel file: the activations and their derivatives,
a dot with the precision the dtype asks for, and the scale / row-scale tiles. A kernel file imports what it
uses (Triton resolves the helpers a kernel calls through that kernel's module globals).

Activation ids (adapterfuse._checks.ACTIVATIONS): 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu;
act(0) = 0 for all of them, which is what lets the kernels zero-pad r.
"""
try:
    import triton
    import triton.language as tl
except ImportError:  # the backends report it (triton_adapter.unavailable_reason)
    triton = None

if triton is not None:

    @triton.jit
    def tanh(z):
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0

    @triton.jit
    def act(h, ACT: tl.constexpr):
        """a = act(h), h fp32. ids: 0 identity, 1 relu, 2 gelu (erf), 3 gelu_tanh, 4 silu."""
        if ACT == 0:
            a = h
        elif ACT == 1:
            a = tl.where(h < 0.0, 0.0, h)  # keeps NaN as NaN, like torch.relu
        elif ACT == 2:
            a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        elif ACT == 3:
            a = 0.5 * h * (1.0 + tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
        else:
            a = h * tl.sigmoid(h)
        return a

    @triton.jit
    def act_grad(h, ACT: tl.constexpr):
        """act'(h): relu' = [h > 0]; gelu' = Phi(h) + h phi(h);
        gelu_tanh' = 0.5 (1 + t) + 0.5 h (1 - t^2) k (1 + 3 c h^2), t = tanh(k (h + c h^3));
        silu' = sig(h) (1 + h (1 - sig(h)))."""
        if ACT == 0:
            g = tl.full(h.shape, 1.0, tl.float32)
        elif ACT == 1:
            g = tl.where(h <= 0.0, 0.0, 1.0)  # torch's threshold_backward lets NaN through
        elif ACT == 2:
            g = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
        elif ACT == 3:
            t = tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
            g = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        else:
            sg = tl.sigmoid(h)
            g = sg * (1.0 + h * (1.0 - sg))
        return g

    @triton.jit
    def dot(a, b, acc, PREC: tl.constexpr):
        """acc + a @ b in fp32. PREC is "ieee" or "tf32" for fp32 operands, "" for fp16/bf16."""
        if PREC == "":
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
        return acc

    @triton.jit
    def scale_tile(S, s_value, cols, c_mask, SCALE_MODE: tl.constexpr, BLOCK_D: tl.constexpr):
        """The scale for a tile of columns, fp32 [BLOCK_D]: float (0), one element (1), per channel (2)."""
        if SCALE_MODE == 0:
            s = tl.zeros((BLOCK_D,), tl.float32) + s_value  # s_value is a runtime scalar
        elif SCALE_MODE == 1:
            s = tl.full((BLOCK_D,), 1.0, tl.float32) * tl.load(S).to(tl.float32)
        else:
            s = tl.load(S + cols, mask=c_mask, other=0.0).to(tl.float32)
        return s

    @triton.jit
    def row_scale(G, tokens, rows, row_mask, HAS_G: tl.constexpr, BLOCK_M: tl.constexpr):
        """g[m] = sample_scale[m // tokens] as fp32 [BLOCK_M] (1 without sample_scale)."""
        if HAS_G:
            g = tl.load(G + rows // tokens, mask=row_mask, other=0.0).to(tl.float32)
        else:
            g = tl.full((BLOCK_M,), 1.0, tl.float32)
        return g

    @triton.jit
    def chunk_of(pid, BLK_END, SEG_START, SEG_LEN, NG, CHUNK, BLOCK_G: tl.constexpr):
        """Adapter bank: (start in ORDER, row count <= CHUNK, group) of program pid's chunk of rows.

        The rows are grouped by adapter (group = id + 1; group 0 = rows without an adapter): ORDER [M] lists them
        group by group, SEG_START / SEG_LEN [NG] give each group's slice of ORDER, BLK_END [NG] (int32) the
        inclusive running count of CHUNK-row chunks per group. Program pid takes chunk pid - BLK_END[g - 1] of
        the group g whose chunks cover pid (found by counting the ends <= pid among BLOCK_G >= NG). The grid is
        an upper bound on the chunk count: programs past the last chunk get 0 rows."""
        gg = tl.arange(0, BLOCK_G)
        ends = tl.load(BLK_END + gg, mask=gg < NG, other=2147483647)
        grp = tl.sum((ends <= pid).to(tl.int32), axis=0)
        valid = grp < NG
        grp = tl.minimum(grp, NG - 1)
        j = (pid - tl.load(BLK_END + grp - 1, mask=grp > 0, other=0)).to(tl.int64)
        start = tl.load(SEG_START + grp) + j * CHUNK
        n = tl.minimum(tl.load(SEG_LEN + grp) - j * CHUNK, CHUNK)
        return start, tl.where(valid, n, 0), grp

    @triton.jit
    def chunk_rows(ORDER, start, n, m0, BLOCK_M: tl.constexpr):
        """Rows m0 .. m0 + BLOCK_M of a chunk of n rows that starts at ORDER[start]: (int64 rows, mask)."""
        offs = m0 + tl.arange(0, BLOCK_M)
        mask = offs < n
        rows = tl.load(ORDER + start + offs, mask=mask, other=0)
        return rows, mask

    @triton.jit
    def block_rows(pid, M, ORDER, BLK_END, SEG_START, SEG_LEN, NG, BANK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_G: tl.constexpr):
        """The rows of program pid of a row-block kernel: (int64 rows [BLOCK_M], mask, group). One adapter:
        rows pid * BLOCK_M + [0, BLOCK_M), group 1. Adapter bank: the BLOCK_M-row chunk chunk_of gives."""
        if BANK:
            start, n, grp = chunk_of(pid, BLK_END, SEG_START, SEG_LEN, NG, BLOCK_M, BLOCK_G)
            rows, row_mask = chunk_rows(ORDER, start, n, 0, BLOCK_M)
        else:
            rows32 = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows32 < M
            rows = rows32.to(tl.int64)
            grp = tl.full([], 1, tl.int32)
        return rows, row_mask, grp

    @triton.jit
    def dropout_tile(v, seed, rows, d0, threshold, keep_scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """The fused dropout on the [BLOCK_M, BLOCK_D] tile of the [M, d] rows `rows` x columns d0 + [0, BLOCK_D)
        (d0 a multiple of 4): v * keep / (1 - p), keep(m, c) = word c mod 4 of philox4x32-10(seed, counter
        (c >> 2, m mod 2^32, m >> 32, 0)) >> 8 >= threshold (= round(p 2^24)): one philox call per four columns,
        its four words interleaved back into column order. The same mask as reference.dropout_keep and
        csrc/common/philox.h, bit for bit."""
        k = d0 // 4 + tl.arange(0, BLOCK_D // 4)
        zero = rows[:, None] * 0 + k[None, :] * 0                         # int64 [BM, BD / 4]
        c0 = (k[None, :] + zero).to(tl.uint32)
        c1 = (rows[:, None] + zero).to(tl.uint32)
        c2 = ((rows[:, None] >> 32) + zero).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero.to(tl.uint32))
        # join adds a new minor dimension: join(join(w0, w2), join(w1, w3)) is [BM, BD / 4, 2, 2] with [k, i, j] =
        # word 2i + j, so the row-major reshape to [BM, BD] puts word n of counter k at column 4k + n
        word = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_D))
        return tl.where((word >> 8).to(tl.int32) >= threshold, v * keep_scale, 0.0)
