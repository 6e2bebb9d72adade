"""The CI compile gate for the Triton kernels: on a machine without a GPU, triton.compile takes every kernel,
with the launch configuration the backend uses (triton_adapter._config), through TTIR, TTGIR, LLVM IR, PTX and
ptxas to a cubin for sm_90 (every dtype and padded rank up to MAX_RANK) and sm_80 (a subset). For each, ptxas
must report zero spill bytes and Triton's shared memory must fit the architecture's opt-in limit: a construct
the interpreter accepts but the compiler rejects, a configuration that spills registers or one that cannot
launch fails here, before any GPU session. The test session runs Triton under the interpreter, so the
compilation runs in a subprocess (tests/_triton_aot.py) without it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def reports():
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the other tests compile and run the kernels themselves")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource / GPUTarget / get_ptxas API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_triton_aot.py"))], env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"Triton compile failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    found = re.search(r"all Triton kernels compiled: (\d+)", proc.stdout)
    assert found, proc.stdout[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == int(found.group(1))
    return reports


def test_every_kernel_rank_and_dtype_compiles(reports):
    # (tests/_triton_aot.py is not imported here: it turns the interpreter off in the process importing it)
    from adapterfuse.ops.triton_adapter import MAX_RANK

    seen = {(r["kernel"], r["dtype"], r["r"]) for r in reports if r["sm"] == 90}
    kernels = {r["kernel"] for r in reports}
    base = {"fwd", "bwd_rows", "bwd_cols_rq", "bwd_cols_wd"}
    # one adapter, the adapter bank, the LayerNorm / dropout variant, and the Linear + adapter kernel (training,
    # inference and its LayerNorm variant)
    linear = {"linear_fwd", "linear_fwd_infer", "linear_fwd_ln"}
    ln_drop = {k + "_ln_drop" for k in base}
    assert kernels == base | {k + "_bank" for k in base} | ln_drop | linear, kernels
    # refused by the backends: triton_linear_adapter.refusal, triton_adapter.ln_dropout_refusal
    refused = {(k, "fp32", 256) for k in linear | ln_drop}
    assert seen == {(k, dt, r) for k in kernels for dt in ("fp32", "fp16", "bf16")
                    for r in (16, 32, 64, 128, 256)} - refused
    assert max(r["r"] for r in reports) == MAX_RANK and {r["sm"] for r in reports} == {80, 90}


def test_no_register_spills(reports):
    bad = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not bad, f"{len(bad)} Triton kernels spill registers: " + "; ".join(
        f"{r['kernel']} {r['dtype']} r={r['r']} sm_{r['sm']} {r['config']}: {r['registers']} regs, "
        f"{r['spill_stores']}/{r['spill_loads']} bytes spilled" for r in bad[:6])


def test_shared_memory_fits(reports):
    bad = [r for r in reports if r["shared"] > r["shared_limit"]]
    assert not bad, "Triton kernels need more shared memory than the GPU has: " + "; ".join(
        f"{r['kernel']} {r['dtype']} r={r['r']} sm_{r['sm']}: {r['shared']} > {r['shared_limit']}" for r in bad)
