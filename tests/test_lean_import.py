"""Importing adapterfuse is cheap and asking what it can do builds nothing (issue 10): `import adapterfuse`
imports neither torch._dynamo nor triton and compiles nothing; available_backends(), backend_status() and
`python -m adapterfuse.info` never start a C++ build, and say "not built yet, builds on first use" where
that is the case. Each check runs in a fresh interpreter with an empty extension cache."""
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code, ext_dir, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERFUSE_CUDA_EMULATION", "ADAPTERFUSE_BACKEND")}
    env["ADAPTERFUSE_EXT_DIR"] = str(ext_dir)
    cmd = [sys.executable, *args] if code is None else [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _built_files(ext_dir):
    return [os.path.join(d, f) for d, _, fs in os.walk(ext_dir) for f in fs if f.endswith((".so", ".o", ".ninja"))]


def test_import_pulls_in_neither_dynamo_nor_triton(tmp_path):
    out = _run("""
        import sys
        import adapterfuse, adapterfuse.merge, adapterfuse.modules
        heavy = [m for m in ("torch._dynamo", "triton", "torch._inductor") if m in sys.modules]
        print("heavy:", heavy)
    """, tmp_path / "ext")
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout, out.stdout
    assert not _built_files(tmp_path / "ext")


def test_status_queries_build_nothing(tmp_path):
    out = _run("""
        import adapterfuse as af
        from adapterfuse.ops._extension import NOT_BUILT
        status = af.backend_status()
        print("cpu:", status["cpu"])
        print("available:", af.available_backends())
        assert status["cpu"] in (None, NOT_BUILT) or "needs" in status["cpu"], status
    """, tmp_path / "ext")
    assert out.returncode == 0, out.stderr
    assert "building" not in out.stderr, out.stderr
    assert not _built_files(tmp_path / "ext"), _built_files(tmp_path / "ext")
    if "not built yet, builds on first use" not in out.stdout:
        pytest.skip(f"no compiler / ninja here: {out.stdout}")
    assert "'cpu'" in out.stdout.split("available:")[1], out.stdout  # buildable counts as available

    info = _run(None, tmp_path / "ext", "-m", "adapterfuse.info")
    assert info.returncode == 0, info.stderr
    assert "available (not built yet, builds on first use)" in info.stdout, info.stdout
    assert "building" not in info.stderr and not _built_files(tmp_path / "ext")
