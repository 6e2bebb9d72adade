"""Row offsets past 2^31 elements (M * d > 2^31): every kernel family must index rows with 64-bit offsets, or the
last rows read and write someone else's memory. On a GPU each op runs on M = 2^31 / d + 64 rows of d = 1024 (bf16,
4 GiB per [M, d] tensor) and its last 64 rows are checked against the float64 reference on those rows alone
(they are independent of the others), and so is the gradient of x in the backward kernels. Without a GPU the
same check runs on a few hundred rows (the test's own logic: which rows, which reference) on the backends that
take CPU tensors here."""
import pytest
import torch

import adapterfuse as af
from adapterfuse.reference import adapter_bank_reference, adapter_reference, linear_adapter_reference
from helpers import device_for, fused_backends, rel_err

D, R, TAIL = 1024, 8, 64


def _run(kind: str, m: int, backend: str, device: str, dtype: torch.dtype):
    """(fused output's last TAIL rows, float64 reference of those rows); for the "_grad" kinds, of the gradient of
    x (row i of dx depends on row i of x and dy alone; the weight gradients sum over every row and are not
    checked here)."""
    grad = kind.endswith("_grad")
    kind = kind[:-len("_grad")] if grad else kind
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    wd, bd = rnd(R, D, std=D ** -0.5), rnd(R)
    wu, bu = rnd(D, R, std=R ** -0.5), rnd(D)
    scale = rnd(D, std=0.5)
    x = torch.randn(m, D, device=device, dtype=dtype)  # on the device: 4 GiB through a CPU generator is slow
    tail = slice(m - TAIL, m)
    if grad:
        x.requires_grad_()
        x_tail = x.detach()[tail].double().requires_grad_()
    f64 = lambda *ts: [t.double() if isinstance(t, torch.Tensor) else t for t in ts]  # noqa: E731
    if kind in ("adapter", "layer_norm"):
        ln = None
        if kind == "layer_norm":
            ln = (rnd(D, std=0.5), rnd(D), 1e-5)
        y = af.fused_adapter(x, wd, bd, wu, bu, scale=scale, skip=x, layer_norm=ln, backend=backend)
        xt = x_tail if grad else x[tail].double()
        ref = adapter_reference(xt, *f64(wd, bd, wu, bu), scale=scale.double(), skip=xt,
                                layer_norm=None if ln is None else (ln[0].double(), ln[1].double(), ln[2]))
    elif kind == "bank":
        a = 3
        wd3, bd3 = wd.expand(a, R, D) * torch.tensor([1.0, -1.0, 0.5], device=device, dtype=dtype)[:, None, None], \
            bd.expand(a, R).contiguous()
        wu3, bu3 = wu.expand(a, D, R).contiguous(), bu.expand(a, D).contiguous()
        ids = torch.arange(m, device=device) % (a + 1) - 1  # -1 (no adapter), 0, 1, 2 in turn
        y = af.fused_adapter_bank(x, wd3, bd3, wu3, bu3, ids, skip=x, backend=backend)
        xt = x_tail if grad else x[tail].double()
        ref = adapter_bank_reference(xt, *f64(wd3, bd3, wu3, bu3), ids[tail], skip=xt)
    else:  # "linear": a frozen Linear(D, D) and the adapter on its output, the residual added before it
        w, b = rnd(D, D, std=D ** -0.5), rnd(D)
        y = af.fused_linear_adapter(x, w, b, wd, bd, wu, bu, scale=scale, residual=x, backend=backend)
        ref = linear_adapter_reference(*f64(x[tail], w, b, wd, bd, wu, bu), scale=scale.double(),
                                       residual=x[tail].double())
    if not grad:
        return y.detach()[tail], ref
    dy = torch.randn(TAIL, D, generator=gen).to(device=device, dtype=dtype)
    dy_full = torch.zeros_like(y)
    dy_full[tail] = dy
    (dx,) = torch.autograd.grad(y, [x], dy_full)
    (dx_ref,) = torch.autograd.grad(ref, [x_tail], dy.double())
    return dx[tail], dx_ref


KINDS = {"adapter": ("triton", "cuda", "cpu"), "layer_norm": ("triton", "cpu"), "bank": ("triton", "cpu"),
         "linear": ("triton", "cpu"), "adapter_grad": ("triton", "cuda", "cpu"), "bank_grad": ("triton", "cpu")}


def _cases(on_gpu: bool):
    return [(k, b) for k, backends in KINDS.items() for b in backends
            if b in fused_backends() and (device_for(b) == "cuda") == on_gpu]


@pytest.mark.parametrize("kind,backend", _cases(on_gpu=False))
def test_tail_rows_match_the_reference(kind, backend):
    """The large test's logic on a few hundred rows, where the backend takes CPU tensors."""
    y, ref = _run(kind, 300, backend, "cpu", torch.float32)
    assert rel_err(y, ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_offsets_do_not_overflow():
    """Every GPU case in one test, one after the other (up to 16 GiB each): as separate tests, parallel test
    workers could hold several at once."""
    m = 2 ** 31 // D + TAIL
    bad = []
    for kind, backend in _cases(on_gpu=True):
        y, ref = _run(kind, m, backend, "cuda", torch.bfloat16)
        err = rel_err(y, ref)
        if not err < 2e-2:
            bad.append(f"{kind} on {backend}: rel err {err:.2e} in the last {TAIL} rows")
        del y, ref
        torch.cuda.empty_cache()
    assert _cases(on_gpu=True) and not bad, bad
