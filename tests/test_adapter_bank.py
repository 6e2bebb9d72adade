"""The adapter bank (fused_adapter_bank, docs/design.md, Adapter bank): every row through the adapter its id
names, all adapters of a batch in one call per direction. Values and every gradient against the float64
reference, over the id patterns that break grouping (one adapter, all -1, interleaved per token, sorted,
uneven segments), odd shapes, every activation / scale / skip kind, dtypes and layouts; bad input; compile."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapterfuse as af
from adapterfuse.reference import adapter_bank_reference
from helpers import ACTIVATIONS, TOL, check_against_reference, device_for, dtypes_for, make_bank_case


def bank_backends():
    """Backends with adapter-bank kernels that run here (the reference is the oracle, not a subject)."""
    return [b for b in ("cpu", "triton") if b in af.available_backends()]


BANK = bank_backends()
pytestmark = pytest.mark.skipif(not BANK, reason="no backend with adapter-bank kernels runs here")


def _case(backend, *args, **kwargs):
    """make_bank_case on the backend's device (Triton: CUDA on a GPU, CPU tensors under the interpreter)."""
    return make_bank_case(*args, device=device_for(backend), **kwargs)


def _check(backend, t, kw, dtype):
    return check_against_reference(backend, t, kw, TOL[dtype], fn=af.fused_adapter_bank, ref=adapter_bank_reference)


def _ids(pattern, rows, adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    if pattern == "one":
        return [adapters - 1] * rows
    if pattern == "none":
        return [-1] * rows
    if pattern == "interleaved":
        return [(i % (adapters + 1)) - 1 for i in range(rows)]  # -1, 0, 1, ..., A-1, -1, 0, ...
    if pattern == "sorted":
        return sorted(torch.randint(-1, adapters, (rows,), generator=g).tolist())
    if pattern == "uneven":  # one big segment, a few tiny ones, one unused adapter
        big = [0] * max(rows - 3, 0)
        return (big + [adapters - 1, -1, min(1, adapters - 1)])[:rows]
    return torch.randint(-1, adapters, (rows,), generator=g).tolist()


PATTERNS = ("one", "none", "interleaved", "sorted", "uneven", "random")


@pytest.mark.parametrize("backend", BANK)
@pytest.mark.parametrize("adapters", [1, 3, 17])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_per_token_ids_match_float64(backend, adapters, pattern):
    shape, d, r = (5, 40), 123, 3  # 200 rows: two row blocks when one adapter has them all
    t, kw = _case(backend, shape, d, r, _ids(pattern, 200, adapters), adapters=adapters, seed=adapters)
    _check(backend, t, kw, torch.float32)


@pytest.mark.parametrize("backend", BANK)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_per_sample_ids_match_float64(backend, pattern):
    t, kw = _case(backend, (7, 9), 64, 48, _ids(pattern, 7, 3, seed=1), adapters=3, scale_kind="adapter",
                           skip_kind="other")
    _check(backend, t, kw, torch.float32)


@pytest.mark.parametrize("backend", BANK)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("scale_kind", ["float", "adapter", "channel"])
@pytest.mark.parametrize("skip_kind", ["none", "x", "other"])
def test_every_mode_matches_float64(backend, activation, scale_kind, skip_kind):
    t, kw = _case(backend, (199,), 33, 5, _ids("random", 199, 4, seed=2), adapters=4, activation=activation,
                           scale_kind=scale_kind, skip_kind=skip_kind, sample=skip_kind != "none",
                           bias=scale_kind != "float")
    _check(backend, t, kw, torch.float32)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BANK for dt in dtypes_for(b) if dt != torch.float32])
@pytest.mark.parametrize("shape,d,r", [((1,), 123, 3), ((6, 11), 1000, 48), ((3, 4), 8, 1)])
def test_half_precision_matches_float64(backend, dtype, shape, d, r):
    rows = shape[0] * (shape[1] if len(shape) > 1 else 1)
    t, kw = _case(backend, shape, d, r, _ids("random", rows, 5, seed=3), adapters=5, dtype=dtype)
    _check(backend, t, kw, dtype)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BANK for dt in dtypes_for(b)])
@pytest.mark.parametrize("r", [3, 48])
def test_every_block_kind_matches_float64(backend, dtype, r):
    """Adapter 0: a full block of consecutive rows, then a short block; adapter 1: a full block of rows scattered
    over x (every third row is -1), then a short scattered block. The CPU kernel runs these four differently
    (sgemm in place, skinny loops, skinny loops in place on scattered fp32 rows / gathered sgemm for r > 32 or
    half precision); d = 123 leaves a tail past the loops' 8-float chunks."""
    ids = [0] * 128 + [-1 if i % 3 == 0 else 1 for i in range(300)] + [0] * 5
    t, kw = _case(backend, (len(ids),), 123, r, ids, adapters=2, dtype=dtype, scale_kind="channel",
                  skip_kind="x", seed=r)
    _check(backend, t, kw, dtype)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BANK for dt in dtypes_for(b)])
@pytest.mark.parametrize("r", [17, 40, 100, 129, 256])
def test_every_rank_bucket_matches_float64(backend, dtype, r):
    """Every padded rank above 16 (Triton's BLOCK_R 32 ... 256, each with its own launch configuration, and the CPU
    kernels' sgemm path), r = 256 being MAX_RANK: two adapters with a full and a short row block each, rows
    without an adapter between them, d = 45 a tail past every BLOCK_D."""
    ids = [0] * 70 + [-1] * 3 + [1] * 20 + [0] * 5
    t, kw = _case(backend, (len(ids),), 45, r, ids, adapters=2, dtype=dtype, scale_kind="channel", skip_kind="x",
                  sample=True, seed=r)
    _check(backend, t, kw, dtype)


def _up_major(w_up):
    """w_up [A, d, r] stored as AdapterBank keeps it: [A, r, d] memory seen as [A, d, r]."""
    return w_up.detach().transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b in BANK for dt in dtypes_for(b)])
@pytest.mark.parametrize("r", [3, 8, 48])
@pytest.mark.parametrize("scale_kind", ["float", "adapter", "channel"])
def test_up_major_w_up_matches_float64(backend, dtype, r, scale_kind):
    """w_up in AdapterBank's layout (the CPU kernels read each adapter's [r, d] rows as they are, no transpose, and
    sum d_w_up in that layout): every block kind of test_every_block_kind_matches_float64 plus a short adapter,
    values and every gradient against float64; the eager gradient of w_up comes back in w_up's own layout."""
    ids = [0] * 128 + [-1 if i % 3 == 0 else 1 for i in range(300)] + [0] * 5 + [2] * 7
    t, kw = _case(backend, (len(ids),), 123, r, ids, adapters=4, dtype=dtype, scale_kind=scale_kind, skip_kind="x",
                  seed=r)
    t["w_up"] = _up_major(t["w_up"]).requires_grad_()
    _check(backend, t, kw, dtype)
    y = af.fused_adapter_bank(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    y.sum().backward()
    if backend == "cpu":
        assert t["w_up"].grad.stride() == t["w_up"].stride()
    assert torch.count_nonzero(t["w_up"].grad[3]) == 0  # adapter 3 is unused


@pytest.mark.skipif("triton" not in BANK, reason="Triton is not available")
def test_triton_reads_up_major_w_up_in_place():
    """The Triton kernels take an up-major bank w_up as it is (element strides (1, d) along d and r, no copy per
    call), a contiguous one with (r, 1), anything else (and a single adapter's [d, r]) contiguous."""
    from adapterfuse.ops.triton_adapter import _w_up_layout

    w = torch.randn(3, 20, 4)
    up = _up_major(w)
    got, strides = _w_up_layout(up)
    assert got.data_ptr() == up.data_ptr() and strides == (1, 20)
    got, strides = _w_up_layout(w)
    assert got.data_ptr() == w.data_ptr() and strides == (4, 1)
    odd = w.transpose(0, 1).contiguous().transpose(0, 1)  # adapters interleaved: made contiguous
    got, strides = _w_up_layout(odd)
    assert got.is_contiguous() and strides == (4, 1) and torch.equal(got, w)
    got, strides = _w_up_layout(w[0].t().contiguous().t())  # one adapter's [d, r], transposed
    assert got.is_contiguous() and strides == (4, 1)
    got, strides = _w_up_layout(_up_major(w[:1]))  # A = 1
    assert strides == (1, 20)


@pytest.mark.skipif("cpu" not in BANK, reason="the C++ extension is not available")
@pytest.mark.parametrize("r", [3, 8, 48])
@pytest.mark.parametrize("scale_kind", ["unit", "adapter", "channel", "channel_inf"])
def test_up_major_w_up_equals_contiguous_cpu(r, scale_kind):
    """The same bank with w_up contiguous and up-major gives the same output and gradients: bit for bit with a unit
    scale and r <= 8 (the same products in the same order; the contiguous layout transposed per call), to rounding
    otherwise (up-major applies the scale per column to the branch, s (.) (a w_up^T), where the contiguous layout
    folds it into a copy of w_up; r = 48: sgemm with the other transpose flag); a non-finite scale takes the
    unfolded forward in both."""
    ids = [0] * 130 + [-1 if i % 3 == 0 else 1 for i in range(150)] + [2] * 9
    kind = {"unit": "float", "channel_inf": "channel"}.get(scale_kind, scale_kind)
    t, kw = make_bank_case((len(ids),), 40, r, ids, adapters=3, scale_kind=kind, skip_kind="x", seed=r)
    names = ["x", "w_down", "b_down", "w_up", "b_up"] + ([] if scale_kind == "unit" else ["scale"])
    if scale_kind == "channel_inf":
        with torch.no_grad():
            t["scale"][1, 7] = float("inf")
    outs = []
    for layout in (lambda w: w.detach().contiguous(), _up_major):
        ins = {k: (layout(t[k]) if k == "w_up" else t[k].detach()).requires_grad_() for k in names}
        scale = 1.0 if scale_kind == "unit" else ins["scale"]
        y = af.fused_adapter_bank(ins["x"], ins["w_down"], ins["b_down"], ins["w_up"], ins["b_up"],
                                  kw["adapter_index"], scale=scale, skip=ins["x"], backend="cpu")
        if scale_kind == "channel_inf":
            outs.append([y])
            continue
        grads = torch.autograd.grad(y, [ins[k] for k in names], torch.randn(y.shape,
                                    generator=torch.Generator().manual_seed(0)))
        outs.append([y] + list(grads))
    for i, (a, b) in enumerate(zip(*outs)):
        if r <= 8 and scale_kind == "unit":
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BANK)
def test_unused_adapters_get_exactly_zero_gradients(backend):
    t, kw = _case(backend, (4, 6), 16, 4, [0, 2, 2, -1], adapters=4, sample=False)
    y = af.fused_adapter_bank(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    y.square().sum().backward()
    for name in ("w_down", "b_down", "w_up", "b_up", "scale"):
        g = t[name].grad
        assert torch.count_nonzero(g[1]) == 0 and torch.count_nonzero(g[3]) == 0, name
        assert torch.count_nonzero(g[0]) > 0 and torch.count_nonzero(g[2]) > 0, name
    x_grad_none_row = t["x"].grad[3]  # sample 3 has no adapter: dx = dy (skip is x) = 2 y = 2 x
    torch.testing.assert_close(x_grad_none_row, 2 * t["x"][3].detach())


@pytest.mark.parametrize("backend", BANK)
def test_layouts_and_int32_ids(backend):
    """A row-strided x, an expanded (stride-0) skip, int32 ids and a transposed-then-copied bank."""
    t, kw = _case(backend, (6, 5), 24, 4, _ids("random", 30, 3, seed=4), adapters=3, skip_kind="other")
    dev = device_for(backend)
    wide = torch.zeros(6, 5, 27, device=dev)
    wide[..., 1:25] = t["x"].detach()
    t["x"] = wide[..., 1:25].requires_grad_()
    t["skip"] = kw["skip"] = torch.randn(1, 5, 24, device=dev).expand(6, 5, 24)
    kw["adapter_index"] = kw["adapter_index"].to(torch.int32)
    w_up_t = t["w_up"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # non-contiguous
    t["w_up"] = w_up_t
    _check(backend, t, kw, torch.float32)


@pytest.mark.parametrize("backend", BANK)
def test_transposed_x_and_overlapping_skip(backend):
    """x whose last dim is not contiguous (a transpose) and a skip whose rows overlap (as_strided): both are
    copied into the kernels' row layout, values and gradients still match float64."""
    t, kw = _case(backend, (6, 5), 16, 3, _ids("random", 30, 3, seed=5), adapters=3, skip_kind="other")
    t["x"] = t["x"].detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_()  # strides (1, 6, 30)
    base = torch.randn(6 * 5 + 16, device=device_for(backend))
    t["skip"] = kw["skip"] = base.as_strided((6, 5, 16), (5, 1, 1))  # neighbouring rows share 15 elements
    assert t["x"].stride(-1) != 1
    _check(backend, t, kw, torch.float32)


@pytest.mark.parametrize("backend", BANK)
@pytest.mark.parametrize("kind", ["channel_inf", "channel_inf_last", "adapter_nan", "float_inf", "unused_adapter_inf"])
def test_non_finite_scale_matches_reference(backend, kind):
    """An inf / NaN in one adapter's scale ([A, d] channel, [A], or a float for all): the forward applies the scale
    after u (as the reference does) instead of folding it into w_up, so only that adapter's rows see inf / NaN, at
    the reference's positions. An unused adapter's inf changes nothing. d = 19: an entry past the C++ scan's full
    8-lane chunks too."""
    t, kw = _case(backend, (4, 3), 19, 2, [0, 1, 1, -1], adapters=3, sample=False)
    args = [t[k].detach() for k in ("x", "w_down", "b_down", "w_up", "b_up")]
    scale = t["scale"].detach().clone()
    if kind == "channel_inf":
        scale[1, 3] = float("inf")
    elif kind == "channel_inf_last":
        scale[1, 18] = float("-inf")
    elif kind == "adapter_nan":
        scale = scale[:, 0].clone()
        scale[1] = float("nan")
    elif kind == "float_inf":
        scale = float("inf")
    else:
        scale[2, 5] = float("inf")
    y = af.fused_adapter_bank(*args, kw["adapter_index"], scale=scale, skip=args[0], backend=backend)
    ref = adapter_bank_reference(*args, kw["adapter_index"], scale=scale, skip=args[0])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isfinite(y[3]).all()  # no adapter: y = skip
    assert torch.isfinite(y[0]).all() == (kind != "float_inf")
    assert torch.isfinite(y[1]).all() == (kind == "unused_adapter_inf")


@pytest.mark.parametrize("backend", BANK)
@pytest.mark.parametrize("poison", ["scale_float_inf", "scale_adapter0_inf", "x_inf", "dy_inf", "sample_scale_inf"])
def test_rows_without_adapter_untouched_by_non_finite_values(backend, poison):
    """Rows whose id is -1 are y = skip, dx = dy (skip is x), d_sample_scale = 0, whatever the adapters' scales hold
    (a float scale of inf, adapter 0's scale inf: the Triton kernels run those rows with adapter 0's masked weights
    and once computed dy * s * 0 = NaN there) and whatever sits in those rows (inf in x, dy or their sample_scale);
    the other rows and every weight gradient match the reference on the same inputs."""
    t, kw = _case(backend, (4, 3), 8, 2, [0, -1, 1, -1], adapters=2)
    names = ["x", "w_down", "b_down", "w_up", "b_up", "scale", "sample_scale"]
    vals = {k: t[k].detach().clone() for k in names}
    dy = torch.randn(4, 3, 8, device=vals["x"].device)
    clean = [0, 2]  # samples with an adapter
    if poison == "scale_float_inf":
        vals["scale"] = float("inf")
        clean = []  # every used adapter's rows are non-finite (as in the reference)
    elif poison == "scale_adapter0_inf":
        vals["scale"][0, 2] = float("inf")
        clean = [2]
    elif poison == "x_inf":
        vals["x"][1, 0, 3] = float("inf")
    elif poison == "dy_inf":
        dy[3, 1, 5] = float("inf")
    else:
        vals["sample_scale"][3] = float("inf")
    leaves = {k: v.requires_grad_() for k, v in vals.items() if isinstance(v, torch.Tensor)}

    def run(fn, **extra):
        return fn(vals["x"], vals["w_down"], vals["b_down"], vals["w_up"], vals["b_up"], kw["adapter_index"],
                  scale=vals["scale"], skip=vals["x"], sample_scale=vals["sample_scale"], **extra)

    y = run(af.fused_adapter_bank, backend=backend)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))
    for b in (1, 3):  # no adapter
        torch.testing.assert_close(y[b], vals["x"][b], rtol=0, atol=0)
        torch.testing.assert_close(grads["x"][b], dy[b], rtol=0, atol=0)
        assert grads["sample_scale"][b] == 0
    ref = run(adapter_bank_reference)
    ref_grads = dict(zip(leaves, torch.autograd.grad(ref, list(leaves.values()), dy)))
    for b in clean:
        torch.testing.assert_close(y[b], ref[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads["x"][b], ref_grads["x"][b], rtol=1e-5, atol=1e-5)
    if poison in ("x_inf", "dy_inf", "sample_scale_inf"):  # only rows without an adapter hold the inf
        for k in leaves:
            if k != "x":
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BANK)
@given(data=st.data())
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_random_banks_match_float64(backend, data):
    adapters = data.draw(st.integers(1, 9))
    per_sample = data.draw(st.booleans())
    lead = data.draw(st.lists(st.integers(1, 7), min_size=1, max_size=2))
    d, r = data.draw(st.integers(1, 70)), data.draw(st.integers(1, 20))
    rows = lead[0] if per_sample else int(torch.tensor(lead).prod())
    ids = data.draw(st.lists(st.integers(-1, adapters - 1), min_size=rows, max_size=rows))
    t, kw = _case(backend, tuple(lead), d, r, ids, adapters=adapters,
                           dtype=data.draw(st.sampled_from(dtypes_for(backend))),
                           activation=data.draw(st.sampled_from(ACTIVATIONS)),
                           scale_kind=data.draw(st.sampled_from(["float", "adapter", "channel"])),
                           skip_kind=data.draw(st.sampled_from(["none", "x", "other"])),
                           sample=data.draw(st.booleans()), bias=data.draw(st.booleans()),
                           seed=data.draw(st.integers(0, 999)))
    _check(backend, t, kw, t["x"].dtype)


def _small():
    t, kw = make_bank_case((3, 4), 8, 2, [0, 1, -1], adapters=2)
    return (t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"]), kw


@pytest.mark.parametrize("backend", ["torch"] + BANK)
def test_bad_ids_are_refused_before_any_kernel(backend):
    args, kw = _small()
    for bad, err, msg in (([0, 2, 0], ValueError, r"ids must be in \[-1, A\) = \[-1, 2\)"),
                          ([0, -2, 0], ValueError, "holds -2"),
                          ([0.0, 1.0, 0.0], TypeError, "integer tensor"),
                          ([0, 1], ValueError, r"\[B\] = \[3\]"),
                          ([[0, 1, 0]], ValueError, r"\[B\] = \[3\]")):
        kw["adapter_index"] = torch.tensor(bad)
        with pytest.raises(err, match=msg):
            af.fused_adapter_bank(*args, backend=backend, **kw)


def test_bad_bank_shapes_are_named():
    args, kw = _small()
    x, wd, bd, wu, bu = args
    with pytest.raises(ValueError, match="w_down must be a bank"):
        af.fused_adapter_bank(x, wd[0], bd, wu, bu, **kw)
    with pytest.raises(ValueError, match="same number A"):
        af.fused_adapter_bank(x, wd, bd, wu[:1], bu, **kw)
    with pytest.raises(ValueError, match=r"b_up must be \[A, d\]"):
        af.fused_adapter_bank(x, wd, bd, wu, bu[0], **kw)
    kw["scale"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"an \[A\] = \[2\] tensor"):
        af.fused_adapter_bank(*args, **kw)


@pytest.mark.parametrize("backend", BANK)
def test_the_kernel_checks_ids_itself(backend):
    """Called directly (as torch.compile does, where the Python value check is skipped), the bank kernels refuse
    an out-of-range id instead of reading another adapter's weights: the C++ kernel with a ValueError, Triton
    with torch._assert_async (a RuntimeError on CPU tensors; on a GPU a device-side assert, not tested here)."""
    from adapterfuse.ops import registry

    if device_for(backend) != "cpu":
        pytest.skip("a device-side assert would end this process's CUDA context")
    args, kw = _small()
    x, wd, bd, wu, bu = (a.detach() for a in args)
    err = ValueError if backend == "cpu" else RuntimeError
    with pytest.raises(err, match="ids must be in"):
        registry.get(backend).bank.fwd(x.reshape(-1, 8), wd, bd, wu, bu, None, 1.0, None, False, None, 1, "gelu",
                                       torch.tensor([0, 1, 5] * 4))


def test_backends_without_bank_kernels_say_so():
    backend = "cuda"
    if backend not in af.available_backends():
        pytest.skip(f"{backend} does not run here")
    args, kw = _small()
    with pytest.raises(ValueError, match="no adapter-bank kernels yet"):
        af.fused_adapter_bank(*args, backend=backend, **kw)


@pytest.mark.parametrize("backend", BANK)
@pytest.mark.parametrize("up_major", [False, True])
def test_opcheck_bank_ops(backend, up_major):
    """opcheck over both ops (fakes, schemas, autograd registration), w_up contiguous and up-major (the custom op
    returns d_w_up contiguous either way, as its fake says)."""
    from adapterfuse.ops import registry

    ops = registry.get(backend).bank
    t, kw = _case(backend, (3, 4), 12, 3, [0, -1, 2], adapters=3, skip_kind="other")
    if up_major:
        t["w_up"] = _up_major(t["w_up"]).requires_grad_()
    x = t["x"].reshape(12, 12)
    dy = torch.randn_like(x)
    outs = []
    # the index per row [M], and per sample [B] (the kernels expand it over tokens_per_sample = 4 rows)
    for idx in (kw["adapter_index"].repeat_interleave(4), kw["adapter_index"].to(torch.int64)):
        args = (x, t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], 1.0, t["skip"].reshape(12, 12), False,
                t["sample_scale"], 4, "silu", idx)
        torch.library.opcheck(ops.fwd, args)
        det = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        y, h = ops.fwd(*det)
        outs.append([y, h])
        for needs in ([True] * 7, [False, True, False, False, True, False, False]):
            bargs = (dy, det[0], h, *det[1:6], 1.0, det[9], 4, "silu", False, needs, idx)
            torch.library.opcheck(ops.bwd, bargs)
        outs[-1] += list(ops.bwd(dy, det[0], h, *det[1:6], 1.0, det[9], 4, "silu", False, [True] * 7, idx))
    for per_row, per_sample in zip(*outs):  # the same kernels on the same rows: bit for bit
        torch.testing.assert_close(per_sample, per_row, rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in BANK, reason="the C++ extension is not available")
@pytest.mark.parametrize("scale_kind", ["channel", "per_adapter"])
@pytest.mark.parametrize("up_major", [False, True])
def test_cpu_eager_weight_grads_packed(scale_kind, up_major):
    """The CPU eager path returns the bank's weight gradients as views of one allocation (fewer page faults per
    step); they must equal the custom op's separate tensors bit for bit, not overlap, and stay independent when
    accumulated into and modified in place (what an optimizer does to .grad). An up-major w_up gets its gradient
    in its own layout, which autograd keeps as .grad."""
    from adapterfuse.ops import registry

    t, kw = _case("cpu", (3, 5), 10, 3, [0, -1, 2], adapters=4)
    if scale_kind == "per_adapter":
        t["scale"] = (torch.rand(4) + 0.5).requires_grad_()
    if up_major:
        t["w_up"] = _up_major(t["w_up"]).requires_grad_()
    names = ["w_down", "b_down", "w_up", "b_up", "scale"]
    params = [t[k] for k in names]

    def run():
        return af.fused_adapter_bank(t["x"], *params[:4], kw["adapter_index"], scale=params[4], skip=t["x"],
                                     backend="cpu")

    dy = torch.randn(3, 5, 10)
    eager = torch.autograd.grad(run(), params, dy)  # the eager path (EagerOp, packed)
    ops = registry.get("cpu").bank
    x2 = t["x"].detach().reshape(15, 10)
    idx = kw["adapter_index"].to(torch.int64)
    det = [p.detach() for p in params]
    y, h = ops.fwd(x2, det[0], det[1], det[2], det[3], det[4], 1.0, None, True, None, 5, "gelu", idx)
    sep = ops.bwd(dy.reshape(15, 10), x2, h, *det, 1.0, None, 5, "gelu", True, [False, True, True, True, True, True,
                                                                                 False], idx)[1:6]
    for name, a, b in zip(names, eager, sep):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    packed = [g for g, name in zip(eager, names) if name != "scale" or scale_kind == "channel"]
    assert len({g.untyped_storage().data_ptr() for g in packed}) == 1  # one allocation
    spans = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in packed)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
    # as .grad: accumulated over two steps, then modified in place one at a time
    for p in params:
        p.grad = None
    run().backward(dy)
    run().backward(dy)
    for name, p, g in zip(names, params, eager):
        torch.testing.assert_close(p.grad, 2 * g, msg=name)
        assert p.grad.stride() == p.stride() == g.stride(), name
    before = [p.grad.clone() for p in params]
    params[0].grad.zero_()
    params[2].grad.mul_(3)
    for i, (p, b) in enumerate(zip(params, before)):
        expect = torch.zeros_like(b) if i == 0 else (3 * b if i == 2 else b)
        torch.testing.assert_close(p.grad, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BANK)
def test_compile_fullgraph_no_recompile_when_ids_change(backend):
    torch._dynamo.reset()
    t, kw = _case(backend, (4, 6), 16, 4, [0, 1, 2, -1], adapters=3)
    x, wd, bd, wu, bu = t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"]
    s = t["scale"]
    compiles = []

    def count(gm, inputs):
        compiles.append(gm)
        return gm.forward

    f = torch.compile(lambda x, idx: af.fused_adapter_bank(x, wd, bd, wu, bu, idx, scale=s, skip=x, backend=backend),
                      backend=count, fullgraph=True)
    for ids in ([0, 1, 2, -1], [2, 2, 2, 2], [-1, 0, -1, 1]):
        idx = torch.tensor(ids, device=x.device)
        y = f(x, idx)
        ref = adapter_bank_reference(x, wd, bd, wu, bu, idx, scale=s, skip=x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(y.sum(), [x, wd])
        g_ref = torch.autograd.grad(ref.sum(), [x, wd])
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(compiles) == 1, f"{len(compiles)} compilations for three index values"


# ------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("scaling", [0.5, "learned", "channel"])
def test_bank_module_members_round_trip_and_match_single_adapters(scaling):
    """Every member of an AdapterBank, taken out as an Adapter, computes on its own rows exactly what the bank
    computes for them; an Adapter put in is what the bank then runs."""
    torch.manual_seed(0)
    bank = af.AdapterBank.from_config(16, af.AdapterConfig.adapter_plus(bottleneck=4, scaling=scaling, init="bert",
                                                                        drop_path=0.0), ["a", "b", "c"])
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(std=0.3)
    x = torch.randn(5, 3, 16)
    ids = bank.index(["c", None, "a", "a", "b"])
    y = bank(x, ids, skip=x)
    for i, name in enumerate(["a", "b", "c"]):
        member = bank.adapter(name)
        rows = (ids == i).nonzero().squeeze(1)
        torch.testing.assert_close(y[rows], member(x[rows], skip=x[rows]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1], x[1])  # no adapter
    other = af.Adapter.from_config(16, af.AdapterConfig.adapter_plus(bottleneck=4, scaling=scaling, drop_path=0.0))
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(std=0.3)
    bank.set_adapter("b", other)
    y2 = bank(x, ids, skip=x)
    torch.testing.assert_close(y2[4], other(x[4:5], skip=x[4:5])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y2[0], y[0])  # the other members are untouched


def test_bank_module_keeps_up_weight_up_major():
    """AdapterBank stores up_weight [A, d, r] as [A, r, d] transposed (the CPU kernels' layout): kept through .to(),
    deepcopy, load_state_dict of a contiguous state dict and an optimizer step; its gradient arrives in that layout
    (no copy); init draws the same values per element as the contiguous layout under the same seed."""
    import copy

    torch.manual_seed(0)
    bank = af.AdapterBank(16, 4, 3, init="bert")
    up_major = (4 * 16, 1, 16)
    assert bank.up_weight.shape == (3, 16, 4) and bank.up_weight.stride() == up_major
    from adapterfuse.modules import _init_weights

    torch.manual_seed(0)
    wd, wu = torch.empty(3, 4, 16), torch.empty(3, 16, 4)  # contiguous, as banks were stored before
    _init_weights("bert", wd, None, wu, None, None)
    assert torch.equal(bank.down_weight, wd) and torch.equal(bank.up_weight, wu)
    for moved in (bank.to(torch.float64), copy.deepcopy(bank)):
        assert moved.up_weight.stride() == up_major
    bank = bank.to(torch.float32)
    state = {k: v.contiguous() for k, v in bank.state_dict().items()}
    fresh = af.AdapterBank(16, 4, 3, init="bert")
    fresh.load_state_dict(state)
    assert fresh.up_weight.stride() == up_major and torch.equal(fresh.up_weight, bank.up_weight)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    x = torch.randn(5, 7, 16)
    fresh(x, torch.tensor([0, 2, 1, -1, 2])).square().sum().backward()
    assert fresh.up_weight.grad.stride() == up_major
    opt.step()
    assert fresh.up_weight.stride() == up_major and not torch.equal(fresh.up_weight, bank.up_weight)


def test_bank_module_refuses_misfits():
    bank = af.AdapterBank(8, 2, 3)
    assert bank.names == ("0", "1", "2") and len(bank) == 3
    with pytest.raises(ValueError, match="does not fit"):
        bank.set_adapter(0, af.Adapter(8, 3))
    with pytest.raises(KeyError, match="no adapter named"):
        bank.index(["nope"])
    with pytest.raises(ValueError, match="distinct strings"):
        af.AdapterBank(8, 2, ["a", "a"])


@pytest.mark.parametrize("backend", BANK)
def test_training_a_mixed_batch_gives_each_adapter_its_rows(backend):
    """One mixed batch trains several adapters: each member's gradient is the gradient it gets from its own rows
    alone (a single-adapter fused call on those rows)."""
    torch.manual_seed(1)
    dev = device_for(backend)
    bank = af.AdapterBank(12, 3, ["a", "b"], scaling="channel", init="bert", backend=backend).to(dev)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(std=0.3)
    x = torch.randn(6, 4, 12, device=dev)
    ids = torch.tensor([0, 1, 1, -1, 0, 1], device=dev)
    bank(x, ids, skip=x).square().sum().backward()
    for i in range(2):
        member = bank.adapter(i)
        rows = (ids == i).nonzero().squeeze(1)
        member(x[rows], skip=x[rows]).square().sum().backward()
        torch.testing.assert_close(bank.down_weight.grad[i], member.down.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bank.up_weight.grad[i], member.up.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bank.scale.grad[i], member.scale.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- integrations


@pytest.mark.parametrize("family", ["bert", "llama", "timm"])
@pytest.mark.parametrize("position", ["post", "houlsby", "parallel"])
def test_add_adapters_with_banks_runs_each_sample_through_its_adapter(family, position):
    """add_adapters(..., adapters=[...]) puts an AdapterBank at every site; under adapter_index(model, ids)
    each sample's output is what a model with that single adapter (the bank member's weights) gives, and a
    sample with no adapter gets the frozen model's output."""
    import copy

    import models

    torch.manual_seed(0)
    if family == "timm":
        base, inputs = models.timm_standin()
    else:
        pytest.importorskip("transformers")
        base, inputs = models.HF_MODELS[family]()
    cfg = af.AdapterConfig.adapter_plus(bottleneck=3, position=position, drop_path=0.0)
    banked = copy.deepcopy(base)
    names = af.add_adapters(banked, cfg, adapters=["a", "b"])
    banks = dict(banked.named_modules())
    assert names and all(isinstance(banks[n], af.AdapterBank) for n in names)
    with torch.no_grad():
        for n in names:
            for p in banks[n].parameters():
                p.normal_(std=0.3)

    def run(model):
        out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state

    with pytest.raises(ValueError, match="adapter_index"):
        run(banked)
    with torch.no_grad(), af.adapter_index(banked, ["b", None]):
        y = run(banked)
    assert all(banks[n].current_index is None for n in names)  # restored after the block
    single = copy.deepcopy(base)
    af.add_adapters(single, cfg)
    singles = dict(single.named_modules())
    for n in names:
        singles[n].load_state_dict(banks[n].adapter("b").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(y[0], run(single)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y[1], run(base)[1], rtol=1e-4, atol=1e-5)
    af.remove_adapters(banked)
    assert not any(isinstance(m, af.AdapterBank) for m in banked.modules())
