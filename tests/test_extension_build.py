"""Building / loading the C++ extension: clear messages when it cannot be had, refusal of an
ahead-of-time build made for another torch, and `python -m adapterfuse.info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from adapterfuse.ops import _extension


def test_aot_build_for_another_torch_is_refused(tmp_path, monkeypatch):
    (tmp_path / "_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not really a library")
    info = tmp_path / "_ext_build.json"
    info.write_text(json.dumps({"torch": "1.0.0", "cuda": "9.0"}))
    monkeypatch.setattr(_extension, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(_extension, "AOT_INFO", info)
    with pytest.raises(_extension.ExtensionUnavailable) as e:
        _extension._load_aot()
    msg = str(e.value)
    assert "built for torch 1.0.0 / CUDA 9.0" in msg and torch.__version__ in msg and "ADAPTERFUSE_BUILD_EXT=1" in msg


def test_aot_build_without_version_record_is_refused(tmp_path, monkeypatch):
    (tmp_path / "_ext.so").write_bytes(b"")
    monkeypatch.setattr(_extension, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(_extension, "AOT_INFO", tmp_path / "_ext_build.json")
    with pytest.raises(_extension.ExtensionUnavailable, match="built for torch None"):
        _extension._load_aot()


def test_no_aot_build_means_jit(tmp_path, monkeypatch):
    monkeypatch.setattr(_extension, "PACKAGE_DIR", tmp_path)
    assert _extension._load_aot() is None


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERFUSE_EXT_DIR", str(tmp_path))  # an empty cache: a build is needed
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(_extension.ExtensionUnavailable, match="C\\+\\+ compiler.*no-such-compiler-xyz"):
        _extension._load_jit()


def test_missing_ninja_is_named(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("ADAPTERFUSE_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "is_ninja_available", lambda: False)
    with pytest.raises(_extension.ExtensionUnavailable, match="ninja"):
        _extension._load_jit()


def test_info_cli_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "adapterfuse.info"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for name in ("torch", "triton", "cuda", "cpu"):
        assert f"  {name}" in out.stdout
    assert torch.__version__ in out.stdout
    # which ops each fused backend has kernels for
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    assert "kernels for: adapter, adapter_ln_dropout, adapter_bank, linear_adapter" in lines["cpu"], out.stdout
    assert "kernels for: adapter, adapter_ln_dropout, adapter_bank, linear_adapter" in lines["triton"], out.stdout
    assert lines["cuda"].endswith("kernels for: adapter"), out.stdout
    if os.environ.get("ADAPTERFUSE_CUDA_EMULATION") == "1":  # tests/conftest.py without a GPU
        assert "cuda     available" in out.stdout and "not a performance path" in out.stdout
    elif not torch.cuda.is_available():
        assert "cuda     unavailable:" in out.stdout
