"""Bad input raises ValueError/TypeError naming the argument and the shapes, before any kernel runs."""
import re

import pytest
import torch

import adapterfuse
from adapterfuse.reference import adapter_reference
from helpers import fused_backends, device_for

BACKENDS = ["torch"] + fused_backends()


def args(d=8, r=3, shape=(2, 5)):
    return (torch.randn(*shape, d), torch.randn(r, d), torch.randn(r), torch.randn(d, r), torch.randn(d))


def call(backend, x, wd, bd, wu, bu, **kw):
    dev = device_for(backend) if backend != "torch" else "cpu"
    mv = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    kw = {k: mv(v) for k, v in kw.items()}
    return adapterfuse.fused_adapter(mv(x), mv(wd), mv(bd), mv(wu), mv(bu), backend=backend, **kw)


CASES = [
    # (description, mutate(args, kwargs), exception, words that must appear in the message)
    ("w_down wrong d", lambda a, k: a.__setitem__(1, torch.randn(3, 9)), ValueError, ["w_down", "[3, 9]", "8"]),
    ("w_down 1-D", lambda a, k: a.__setitem__(1, torch.randn(8)), ValueError, ["w_down"]),
    ("w_up wrong shape", lambda a, k: a.__setitem__(3, torch.randn(3, 8)), ValueError, ["w_up", "[8, 3]", "[3, 8]"]),
    ("b_down wrong", lambda a, k: a.__setitem__(2, torch.randn(4)), ValueError, ["b_down", "[4]"]),
    ("b_up wrong", lambda a, k: a.__setitem__(4, torch.randn(7)), ValueError, ["b_up", "[7]"]),
    ("scale wrong length", lambda a, k: k.update(scale=torch.randn(5)), ValueError, ["scale", "[5]", "8"]),
    ("scale 2-D", lambda a, k: k.update(scale=torch.randn(1, 8)), ValueError, ["scale", "[1, 8]"]),
    ("scale string", lambda a, k: k.update(scale="2"), TypeError, ["scale", "str"]),
    ("scale bool", lambda a, k: k.update(scale=True), TypeError, ["scale"]),
    ("skip wrong shape", lambda a, k: k.update(skip=torch.randn(2, 4, 8)), ValueError, ["skip", "[2, 4, 8]", "[2, 5, 8]"]),
    ("sample_scale wrong length", lambda a, k: k.update(sample_scale=torch.ones(3)), ValueError, ["sample_scale", "[3]", "[2]"]),
    ("sample_scale 2-D", lambda a, k: k.update(sample_scale=torch.ones(2, 1)), ValueError, ["sample_scale"]),
    ("activation unknown", lambda a, k: k.update(activation="tanh"), ValueError, ["activation", "tanh"]),
    ("dtype mismatch", lambda a, k: a.__setitem__(1, a[1].double()), TypeError, ["w_down", "float64", "float32"]),
    ("skip dtype mismatch", lambda a, k: k.update(skip=torch.randn(2, 5, 8, dtype=torch.float16)), TypeError, ["skip"]),
    ("integer x", lambda a, k: a.__setitem__(0, torch.ones(2, 5, 8, dtype=torch.int64)), TypeError, ["x", "int64"]),
    ("x not a tensor", lambda a, k: a.__setitem__(0, [[1.0] * 8]), TypeError, ["x", "list"]),
    ("w_up not a tensor", lambda a, k: a.__setitem__(3, None), TypeError, ["w_up"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("desc,mutate,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(backend, desc, mutate, exc, words):
    a, k = list(args()), {}
    mutate(a, k)
    with pytest.raises(exc) as info:
        call(backend, *a, **k)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_reference_checks_too():
    x, wd, bd, wu, bu = args()
    with pytest.raises(ValueError, match="w_up"):
        adapter_reference(x, wd, bd, wu.t(), bu)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        adapterfuse.fused_adapter(*args(), backend="tpu")


def test_env_default_backend(monkeypatch):
    monkeypatch.setenv("ADAPTERFUSE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ADAPTERFUSE_BACKEND"):
        adapterfuse.fused_adapter(*args())
    monkeypatch.setenv("ADAPTERFUSE_BACKEND", "torch")
    assert adapterfuse.fused_adapter(*args()).shape == (2, 5, 8)


def test_device_mismatch():
    x, wd, bd, wu, bu = args()
    wd = wd.to("meta")
    with pytest.raises(ValueError, match="w_down is on meta"):
        adapterfuse.fused_adapter(x, wd, bd, wu, bu)


@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
def test_unavailable_or_misplaced_backend_is_named(backend):
    """A forced backend that cannot run here says why (not installed / not built / wrong device)."""
    x, wd, bd, wu, bu = args()
    from adapterfuse.ops._extension import NOT_BUILT

    reason = adapterfuse.backend_status()[backend]
    if reason in (None, NOT_BUILT) and device_for(backend) == "cpu":
        pytest.skip(f"{backend} runs on CPU tensors here")
    with pytest.raises(ValueError, match=backend):
        adapterfuse.fused_adapter(x, wd, bd, wu, bu, backend=backend)


@pytest.mark.parametrize("backend", fused_backends())
def test_float64_needs_torch_backend(backend):
    x, wd, bd, wu, bu = (t.double().to(device_for(backend)) for t in args())
    with pytest.raises(TypeError, match="float64"):
        adapterfuse.fused_adapter(x, wd, bd, wu, bu, backend=backend)
    # auto falls back to the reference for float64
    assert adapterfuse.fused_adapter(x, wd, bd, wu, bu).dtype == torch.float64


def test_bf16_under_interpreter_is_refused():
    if "triton" not in fused_backends() or device_for("triton") != "cpu":
        pytest.skip("only meaningful under the Triton interpreter")
    x, wd, bd, wu, bu = (t.bfloat16() for t in args())
    with pytest.raises(TypeError, match="bfloat16"):
        adapterfuse.fused_adapter(x, wd, bd, wu, bu, backend="triton")


def test_zero_rows_work_everywhere():
    for backend in BACKENDS:
        x, wd, bd, wu, bu = args(shape=(0, 4))
        y = call(backend, x, wd, bd, wu, bu, skip=x)
        assert y.shape == (0, 4, 8)


def test_cuda_backend_rank_limit_is_a_value_error(monkeypatch):
    """r > 256 on the CUDA extension is refused before any kernel, whatever the machine."""
    import adapterfuse.functional as F
    from adapterfuse.ops import cuda_adapter

    x, wd, bd, wu, bu = args(d=8, r=300)
    # pretend the CUDA backend is available and runs CPU tensors, so dispatch gets as far as the limit
    monkeypatch.setattr(F, "_unavailable_reason", lambda name: None)
    monkeypatch.setattr(cuda_adapter, "runs_on", lambda device_type: True)
    monkeypatch.setattr(F, "_RESOLVED", {})
    with pytest.raises(ValueError, match="r <= 256.*use backend='torch'"):
        adapterfuse.fused_adapter(x, wd, bd, wu, bu, backend="cuda")
    assert cuda_adapter.MAX_RANK == 256
    # auto, having picked that backend, runs the reference instead of failing
    monkeypatch.setattr(F, "_resolve", lambda *a: "cuda")
    monkeypatch.setattr(F, "_RESOLVED", {})
    y = adapterfuse.fused_adapter(x, wd, bd, wu, bu, backend="auto")
    torch.testing.assert_close(y, adapter_reference(x, wd, bd, wu, bu))


def test_triton_backend_rank_limit(monkeypatch):
    """Triton takes r <= 256 (the compile gate checks shared memory and spills up to there); larger r is refused
    naming the way out, and auto falls back to the reference."""
    import adapterfuse.functional as F
    from adapterfuse.ops import triton_adapter

    assert triton_adapter.MAX_RANK == 256
    x, wd, bd, wu, bu = args(d=8, r=257)
    monkeypatch.setattr(F, "_unavailable_reason", lambda name: None)
    monkeypatch.setattr(triton_adapter, "runs_on", lambda device_type: True)
    monkeypatch.setattr(F, "_RESOLVED", {})
    with pytest.raises(ValueError, match="backend='triton' supports a bottleneck r <= 256"):
        adapterfuse.fused_adapter(x.half(), wd.half(), bd.half(), wu.half(), bu.half(), backend="triton")


def test_auto_backend_rule_on_cpu():
    """auto on CPU tensors: the C++ path for fp32/fp16 where it is built, the reference for bf16 and fp64."""
    from adapterfuse.functional import resolve_backend

    have_cpu = "cpu" in adapterfuse.available_backends()
    for dtype, want in ((torch.float32, "cpu"), (torch.float16, "cpu"), (torch.bfloat16, "torch"),
                        (torch.float64, "torch")):
        expected = want if have_cpu else "torch"
        assert resolve_backend("auto", torch.empty(1, dtype=dtype)) == expected, dtype


def _ext_cases():
    """(name, fwd-argument changes, message) for calls that reach the extension's own entry checks (torch.ops
    calls, or a caller that skipped the Python checks): each must raise naming the argument."""
    return [
        ("b_down length", dict(b_down=torch.randn(4)), "b_down has shape"),
        ("b_up dtype", dict(b_up=torch.randn(8, dtype=torch.float64)), "b_up must have x's dtype"),
        ("scale length", dict(scale=torch.randn(3)), "scale has shape"),
        ("scale integer", dict(scale=torch.ones(1, dtype=torch.int32)), "scale must be a floating-point tensor"),
        ("sample_scale rows", dict(sample_scale=torch.ones(3), tokens=5), "sample_scale has 3 entries of 5 rows"),
        ("h shape", dict(h=torch.empty(10, 4)), "h (the forward's output buffer) must be a contiguous float32"),
        ("h dtype", dict(h=torch.empty(10, 3, dtype=torch.float16)), "must be a contiguous float32"),
        ("y shape", dict(y=torch.empty(10, 7)), "y must be [M, d]"),
    ]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("name,change,message", _ext_cases(), ids=[c[0] for c in _ext_cases()])
def test_extension_entry_checks(backend, name, change, message):
    from adapterfuse.ops import _extension

    if backend not in adapterfuse.available_backends() or device_for(backend) != "cpu":
        pytest.skip(f"the {backend} extension does not take CPU tensors here")
    ext = _extension.load_for(backend)
    a = dict(x=torch.randn(10, 8), w_down=torch.randn(3, 8), b_down=torch.randn(3), w_up=torch.randn(8, 3),
             b_up=torch.randn(8), scale=None, scale_value=1.0, skip=None, skip_is_x=False, sample_scale=None,
             tokens=1, act=2, y=torch.empty(10, 8), h=torch.empty(10, 3))
    a.update(change)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ext.fwd(*a.values())
