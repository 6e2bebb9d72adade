"""Regression tests of issue 9, items 6 and 7: the JIT build (stale locks, unwritable or empty cache paths, a
complete cache without a compiler, the cache key, the first-build message and the fallback warning) and the
smaller traps (d = 0, scale = inf, inf in x with a padded rank, ADAPTERFUSE_BACKEND for calls its backend
cannot run, constructor checks, double backward)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import adapterfuse as af
from adapterfuse import _build
from adapterfuse.ops import _extension
from helpers import cpu_backends, device_for, fused_backends, make_case

HAS_CPU_EXT = "cpu" in af.available_backends()


def _run_py(code: str, env: dict, timeout=300):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full)


# ---- item 6: the JIT build -------------------------------------------------------------------------

def test_stale_torch_lock_is_removed_under_the_build_lock(tmp_path):
    (tmp_path / "lock").write_text("")  # what a build killed inside torch's FileBaton leaves behind
    with _extension._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_build_lock_of_a_killed_process_is_released(tmp_path):
    code = f"""
        import time
        from pathlib import Path
        from adapterfuse.ops import _extension
        with _extension._build_lock(Path({str(tmp_path)!r})):
            print("locked", flush=True)
            time.sleep(600)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        got = threading.Event()

        def take():
            with _extension._build_lock(tmp_path):
                got.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not got.wait(1.0), "the lock is held by the other process"
        proc.send_signal(signal.SIGKILL)  # a build killed half-way
        assert got.wait(30.0), "a killed holder's lock was never released"
    finally:
        proc.kill()
        proc.wait()


def test_unwritable_cache_is_unavailable_not_oserror(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ADAPTERFUSE_EXT_DIR", str(blocker / "cache"))
    with pytest.raises(_extension.ExtensionUnavailable, match="not writable"):
        _extension._load_jit()


def test_auto_falls_back_with_one_warning_when_the_build_fails(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = _run_py("""
        import warnings, torch, adapterfuse as af
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            x = torch.randn(3, 8)
            for _ in range(3):
                y = af.fused_adapter(x, torch.randn(2, 8), None, torch.randn(8, 2), None, skip=x)
        msgs = [str(m.message) for m in w if "C++ extension is unavailable" in str(m.message)]
        print(len(msgs), af.backend_status()["cpu"])
    """, {"ADAPTERFUSE_EXT_DIR": str(blocker / "cache")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 "), out.stdout
    assert "not writable" in out.stdout


def test_empty_ext_dir_means_the_default(monkeypatch):
    monkeypatch.setenv("ADAPTERFUSE_EXT_DIR", "")
    assert _extension.cache_root() == _extension.Path.home() / ".cache" / "adapterfuse"


def test_cache_key_covers_the_cpu_and_the_flags(monkeypatch):
    tag = _build.version_tag(False, native=True)
    monkeypatch.setattr(_build, "_cpu_identity", lambda: "another-cpu flags: avx512f")
    assert _build.version_tag(False, native=True) != tag
    assert _build.version_tag(False, native=False) != _build.version_tag(False, native=True)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension does not build here")
def test_complete_cache_loads_without_a_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    mod = _extension._load_jit()
    assert mod.build_info()["with_cuda"] in (True, False)


def test_first_build_says_what_and_where(tmp_path, monkeypatch, capfd):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("ADAPTERFUSE_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "is_ninja_available", lambda: True)

    def failing_load(**kw):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp, "load", failing_load)
    with pytest.raises(_extension.ExtensionUnavailable, match="compiler exploded"):
        _extension._load_jit()
    err = capfd.readouterr().err
    assert "adapterfuse: building the C++" in err and str(tmp_path) in err


# ---- item 7: the smaller traps ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", fused_backends())
def test_d_zero(backend):
    t, kw = make_case((3, 2), 0, 4, device=device_for(backend), skip_kind="x")
    y = af.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    assert y.shape == (3, 2, 0)
    names = [n for n, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [t[n] for n in names], torch.ones_like(y), allow_unused=True)
    for n, g in zip(names, grads):
        assert g is None or (g.shape == t[n].shape and torch.all(g == 0)), n


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), "tensor", "tensor_last"])
def test_infinite_scale_matches_reference(backend, scale):
    """A non-finite scale anywhere in d (d = 19: the last entry sits past the C++ scan's full 8-lane chunks)."""
    torch.manual_seed(0)
    x = torch.randn(5, 19)
    wd, wu = torch.randn(3, 19), torch.randn(19, 3)
    wu[0] = 0.0  # a zero row: u[:, 0] = b_up[0]
    bu = torch.randn(19)
    if isinstance(scale, str):
        where = 3 if scale == "tensor" else 18
        scale = torch.ones(19)
        scale[where] = float("inf")
    y = af.fused_adapter(x, wd, None, wu, bu, scale=scale, skip=x, backend=backend)
    ref = af.fused_adapter(x, wd, None, wu, bu, scale=scale, skip=x, backend="torch")
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_inf_in_x_with_a_padded_rank(backend):
    """r = 3 is padded to 16 in Triton: inf * 0 in the padding must not make the whole row NaN."""
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    x[1, 5] = float("inf")
    wd, wu = torch.randn(3, 32), torch.randn(32, 3)
    for act in ("relu", "gelu", "identity"):
        y = af.fused_adapter(x, wd, None, wu, None, activation=act, backend=backend)
        ref = af.fused_adapter(x, wd, None, wu, None, activation=act, backend="torch")
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), act
        assert torch.equal(torch.isinf(y), torch.isinf(ref)), act


def test_env_backend_steers_only_what_it_can_run():
    out = _run_py("""
        import torch, adapterfuse as af
        x = torch.randn(3, 8, dtype=torch.float64)
        y = af.fused_adapter(x, torch.randn(2, 8, dtype=torch.float64), None, torch.randn(8, 2, dtype=torch.float64),
                             None)
        m = torch.empty(3, 8, device="meta")
        ym = af.fused_adapter(m, torch.empty(2, 8, device="meta"), None, torch.empty(8, 2, device="meta"), None)
        print(y.dtype, ym.device)
        try:
            af.fused_adapter(x.float(), torch.randn(2, 8), None, torch.randn(8, 2), None, backend="nope")
        except ValueError as e:
            print("ok")
    """, {"ADAPTERFUSE_BACKEND": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.float64", "meta", "ok"]
    bad = _run_py("""
        import torch, adapterfuse as af
        x = torch.randn(3, 8)
        af.fused_adapter(x, torch.randn(2, 8), None, torch.randn(8, 2), None)
    """, {"ADAPTERFUSE_BACKEND": "gpu"})
    assert bad.returncode != 0 and "ADAPTERFUSE_BACKEND" in bad.stderr


def test_constructor_checks():
    with pytest.raises(TypeError, match="dim"):
        af.Adapter(7.5, 4)
    with pytest.raises(ValueError, match="dim"):
        af.Adapter(0, 4)
    with pytest.raises(TypeError, match="bottleneck"):
        af.Adapter(8, True)
    with pytest.raises(ValueError, match="backend"):
        af.Adapter(8, 2, backend="gpu")
    a = af.Adapter(np.int64(8), np.int32(2), scaling=np.float32(0.5), drop_path=np.float64(0.1))
    assert a.dim == 8 and a.bottleneck == 2 and a.scale == 0.5 and type(a.dim) is int
    cfg = af.AdapterConfig(bottleneck=np.int64(4), scaling=np.float64(2.0))
    assert type(cfg.bottleneck) is int and cfg.scaling == 2.0
    with pytest.raises(TypeError, match="bottleneck"):
        af.AdapterConfig(bottleneck=False)
    y = af.fused_adapter(torch.randn(2, 8), torch.randn(2, 8), None, torch.randn(8, 2), None, scale=np.float32(0.5))
    assert y.shape == (2, 8)
    with pytest.raises(TypeError, match="config must be an adapterfuse.AdapterConfig"):
        af.add_adapters(torch.nn.Linear(2, 2), {"bottleneck": 4})
    with pytest.raises(TypeError, match="r must be an int"):
        af.LoRALinear(torch.nn.Linear(4, 4), r=2.0)


@pytest.mark.parametrize("backend", fused_backends())
def test_double_backward_has_a_clear_error(backend):
    t, kw = make_case((2, 5), 12, 3, device=device_for(backend), skip_kind="x")
    y = af.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend=backend, **kw)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), [t["x"]], create_graph=True)  # first order still works
    ref_y = af.fused_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], backend="torch", **kw)
    (ref_gx,) = torch.autograd.grad(ref_y.pow(2).sum(), [t["x"]])
    assert torch.allclose(gx, ref_gx, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        gx.sum().backward()
