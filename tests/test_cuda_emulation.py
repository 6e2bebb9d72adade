"""The CUDA backend's real kernels (csrc/adapter_kernels.cu) and host glue (csrc/bindings.cpp, csrc/adapter_cuda.cpp) run on CPU
tensors under the CUDA emulation (ADAPTERFUSE_CUDA_EMULATION=1, adapterfuse/ops/_emulation.py): values and
every gradient against the float64 reference in fp32 / fp16 / bf16, odd shapes and every rank bucket, and
bit-identical results under different thread schedules (a race or a missing barrier would not be)."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adapterfuse as af
from adapterfuse.ops import _emulation
from adapterfuse.reference import adapter_reference
from helpers import (ACTIVATIONS, GRAD_ARGS, SCALE_KINDS, SKIP_KINDS, _call, check_against_reference, make_case, rel_err,
                     to_double, tol_for)

pytestmark = pytest.mark.skipif(_emulation.cuda_include_dir() is None, reason="no CUDA toolkit headers here")


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    monkeypatch.setenv(_emulation.ENV, "1")
    monkeypatch.setenv("ADAPTERFUSE_EMU_SCHEDULE", "asc")
    from adapterfuse.ops._extension import extension_reason

    why = extension_reason("cuda")  # (builds the emulation on first use)
    if why is not None:
        pytest.fail(f"the CUDA emulation does not build: {why}")


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MATRIX = list(itertools.product(ACTIVATIONS, SCALE_KINDS, SKIP_KINDS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,scale_kind,skip_kind", MATRIX[::2])
def test_matrix(dtype, activation, scale_kind, skip_kind):
    i = MATRIX.index((activation, scale_kind, skip_kind))
    t, kw = make_case((3, 37), 70, 5, dtype=dtype, activation=activation, bias=i % 4 < 2, scale_kind=scale_kind,
                      skip_kind=skip_kind, sample=i % 3 != 0, seed=i)
    check_against_reference("cuda", t, kw, tol_for("cuda", dtype))


# every padded-rank bucket (16, 32, 64, 128, 256), tails in M and d, one-row and one-column cases
SHAPES = [((1,), 1, 1), ((1,), 123, 3), ((199,), 123, 3), ((2, 33), 1000, 48), ((65,), 64, 17), ((31,), 70, 33),
          ((40,), 45, 100), ((33,), 24, 129), ((35,), 40, 256), ((0,), 12, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,d,r", SHAPES)
def test_odd_shapes(dtype, shape, d, r):
    t, kw = make_case(shape, d, r, dtype=dtype, activation="gelu", scale_kind="channel", skip_kind="x", sample=True,
                      seed=d + r)
    check_against_reference("cuda", t, kw, tol_for("cuda", dtype))


@pytest.mark.parametrize("grads", [("x",), ("w_down", "w_up"), ("b_down", "b_up"), ("scale",), ("sample_scale",),
                                   ("w_down", "b_up", "scale", "sample_scale")])
def test_gradient_subsets(grads):
    t, kw = make_case((2, 21), 40, 6, dtype=torch.float16, skip_kind="other", grads=grads)
    check_against_reference("cuda", t, kw, tol_for("cuda", torch.float16))


def _run(t, kw):
    y = _call(af.fused_adapter, t, kw, backend="cuda")
    names = [n for n in GRAD_ARGS if t.get(n) is not None and t[n].requires_grad]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, [t[n] for n in names], dy))


@pytest.mark.parametrize("dtype", DTYPES)
def test_schedules_give_identical_bits(dtype, monkeypatch):
    """Races and missing barriers change results with the order threads run in; correct kernels do not."""
    results = {}
    for schedule in _emulation.SCHEDULES:
        monkeypatch.setenv("ADAPTERFUSE_EMU_SCHEDULE", schedule)
        monkeypatch.setenv("ADAPTERFUSE_EMU_SEED", "7")
        t, kw = make_case((2, 45), 75, 20, dtype=dtype, activation="silu", skip_kind="x", seed=3)
        results[schedule] = _run(t, kw)
    for schedule, outs in results.items():
        for a, b in zip(outs, results["asc"]):
            assert torch.equal(a, b), f"schedule {schedule} differs from asc"


def test_backward_reads_the_saved_h():
    """Regression: bwd() never set the saved pre-activation h in the kernel parameters, so every CUDA backward
    read through a null pointer (a crash here, an illegal address on a GPU). In a subprocess: a crash must
    fail this test, not end the test session."""
    code = textwrap.dedent("""
        import torch, adapterfuse as af
        torch.manual_seed(0)
        x = torch.randn(9, 40, requires_grad=True)
        wd, wu = torch.randn(4, 40, requires_grad=True), torch.randn(40, 4, requires_grad=True)
        g = torch.autograd.grad(af.fused_adapter(x, wd, None, wu, None, skip=x, backend="cuda").sum(), [x, wd, wu])
        r = torch.autograd.grad(af.fused_adapter(x, wd, None, wu, None, skip=x, backend="torch").sum(), [x, wd, wu])
        print(max(((a - b).norm() / b.norm()).item() for a, b in zip(g, r)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    assert out.returncode == 0, f"the CUDA backward crashed (rc {out.returncode}): {out.stderr[-2000:]}"
    assert float(out.stdout.strip()) < 1e-5


# (limit in bytes, dtype, r): an emulated sm_86 / sm_89 (99 KiB per block), where the default tiles of the
# fp16/bf16 backward at r > 32 and of fp32 at r > 64 need more, and a 48 KiB device, where even the default
# forward at r = 64 (53 KiB in fp16) does not fit. The emulation fails any launch above the limit, so a
# correct result proves the launcher chose smaller tiles that fit.
SMALL_SMEM = [(101376, torch.float16, 64), (101376, torch.bfloat16, 200), (101376, torch.float32, 129),
              (49152, torch.float16, 64), (49152, torch.float32, 40)]


@pytest.mark.parametrize("limit,dtype,r", SMALL_SMEM)
def test_smaller_tiles_where_shared_memory_is_smaller(limit, dtype, r, monkeypatch):
    monkeypatch.setenv("ADAPTERFUSE_EMU_SMEM_OPTIN", str(limit))
    t, kw = make_case((3, 23), 100, r, dtype=dtype, activation="gelu", scale_kind="channel", skip_kind="x",
                      sample=True, seed=r)
    check_against_reference("cuda", t, kw, tol_for("cuda", dtype))


def test_refuses_clearly_when_even_the_smallest_tiles_do_not_fit(monkeypatch):
    monkeypatch.setenv("ADAPTERFUSE_EMU_SMEM_OPTIN", "16384")
    t, kw = make_case((2, 10), 32, 200, dtype=torch.float32, skip_kind="x")
    with pytest.raises(RuntimeError, match=r"needs \d+ bytes of shared memory per block even with its smallest tiles"
                                           r", and this GPU allows 16384; use backend='triton' or 'torch'"):
        _run(t, kw)


@pytest.mark.parametrize("scale_kind", ["float", "channel"])
def test_fp16_weight_gradients_keep_their_accuracy_at_a_tiny_scale(scale_kind):
    """Regression: the cols kernel folded s into dy before rounding to fp16, so at s = 1e-5 d_w_up and d_b_up
    lost ~12 % (fp16 subnormals). The backward now multiplies R and q by s after the reduction, in fp32."""
    t, kw = make_case((4, 33), 96, 12, dtype=torch.float16, scale_kind=scale_kind, skip_kind="x", seed=5,
                      grads=("w_down", "w_up", "b_down", "b_up"))
    if scale_kind == "float":
        kw["scale"] = 1e-5
    else:
        with torch.no_grad():
            t["scale"].fill_(1e-5)
    y = _call(af.fused_adapter, t, kw, backend="cuda")
    t64, k64 = to_double(t, kw)
    y64 = _call(adapter_reference, t64, k64)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = ["w_down", "w_up", "b_down", "b_up"]
    grads = torch.autograd.grad(y, [t[n] for n in names], dy.half())
    grads64 = torch.autograd.grad(y64, [t64[n] for n in names], dy)
    for n, g, g64 in zip(names, grads, grads64):
        assert rel_err(g, g64) < 1e-2, (n, rel_err(g, g64))


def _mutant(tmp_path_factory, name, old, new, count=1):
    """The emulation built from a copy of adapter_kernels.cu with `old` replaced by `new` (count times)."""
    src = (_emulation.csrc_dir() / "adapter_kernels.cu").read_text()
    assert src.count(old) >= count, f"mutation site not found: {old!r}"
    cu = tmp_path_factory.mktemp(name) / "adapter_kernels.cu"
    cu.write_text(src.replace(old, new, count))
    return _emulation.build(cu.parent / "build", kernels=cu, name=f"adapterfuse_mutant_{name}")


def test_mutation_missing_barrier_is_caught(tmp_path_factory, monkeypatch):
    """Remove the barrier between loading a phase-1 tile into shared memory and multiplying it: the emulation
    must notice (wrong values against the reference, or results that change with the schedule)."""
    from adapterfuse.ops import _extension

    old = ("    load_tile<T>(ws, L.ld_n, RP, L.bn, static_cast<const T*>(p.w_down), p.d, 0, p.r, k0, p.d, p.vec_wd);\n"
           "    __syncthreads();\n")
    new = "    load_tile<T>(ws, L.ld_n, RP, L.bn, static_cast<const T*>(p.w_down), p.d, 0, p.r, k0, p.d, p.vec_wd);\n"
    mutant = _mutant(tmp_path_factory, "nobarrier", old, new)
    monkeypatch.setattr(_extension, "load_for", lambda backend: mutant)
    caught = []
    for schedule in ("asc", "desc", "warp"):
        monkeypatch.setenv("ADAPTERFUSE_EMU_SCHEDULE", schedule)
        t, kw = make_case((2, 40), 130, 8, dtype=torch.float16, skip_kind="x", grads=(), seed=1)
        y = _call(af.fused_adapter, t, kw, backend="cuda")
        ref = _call(af.fused_adapter, t, kw, backend="torch")
        caught.append(bool(torch.isnan(y).any()) or not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2))
    assert any(caught), "a missing __syncthreads() went unnoticed under every schedule"


def test_mutation_off_by_one_read_is_caught(tmp_path_factory, monkeypatch):
    """Let the tile loader read one column past the end of each row (gc + v <= cols instead of <): the extra
    element (the next row's first) enters the padded column of x's tile and of w_down's tile, and the
    emulation must see wrong values."""
    from adapterfuse.ops import _extension

    mutant = _mutant(tmp_path_factory, "offbyone", "(gr < rows && gc + v < cols) ?", "(gr < rows && gc + v <= cols) ?")
    monkeypatch.setattr(_extension, "load_for", lambda backend: mutant)
    t, kw = make_case((3, 5), 37, 4, dtype=torch.float32, skip_kind="none", grads=(), seed=2)
    y = _call(af.fused_adapter, t, kw, backend="cuda")
    ref = _call(af.fused_adapter, t, kw, backend="torch")
    assert not torch.allclose(y, ref, rtol=1e-4, atol=1e-4), "an off-by-one read went unnoticed"
