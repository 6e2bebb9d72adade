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
