"""The CUDA emulation built with AddressSanitizer and UndefinedBehaviorSanitizer (issue 8): the real kernels and
host glue run a smaller set of cases (every dtype, forward and every gradient, tails, every padded-rank bucket,
strided views, the smaller tiles of a 99 KiB device, the extension's refusals) and any out-of-bounds access,
use-after-free or undefined behaviour fails the run. The sanitized module only loads into a process started with
the ASan runtime preloaded, so everything runs in a subprocess."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapterfuse.ops import _emulation

pytestmark = pytest.mark.skipif(_emulation.cuda_include_dir() is None or _emulation.asan_runtime() is None,
                                reason="needs the CUDA toolkit headers and the compiler's ASan runtime")

SCRIPT = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    import torch
    import adapterfuse as af
    from adapterfuse.ops import _emulation, _extension
    from helpers import check_against_reference, make_case, tol_for

    mod = _emulation.build(Path(sys.argv[1]), name="adapterfuse_emu_sanitized",
                           extra_cflags=_emulation.SANITIZE_CFLAGS, extra_ldflags=_emulation.SANITIZE_LDFLAGS)
    _extension.load_for = lambda backend: mod
    cases = [((3, 17), 70, 5, torch.float32, "x"), ((1,), 1, 1, torch.float16, "other"),
             ((2, 33), 123, 48, torch.bfloat16, "none"), ((31,), 40, 129, torch.float16, "x"),
             ((9,), 24, 256, torch.float32, "other")]
    n = 0
    for limit in ("232448", "101376"):
        os.environ["ADAPTERFUSE_EMU_SMEM_OPTIN"] = limit
        for i, (shape, d, r, dtype, skip) in enumerate(cases):
            t, kw = make_case(shape, d, r, dtype=dtype, activation=("gelu", "silu", "relu")[i % 3], skip_kind=skip,
                              scale_kind=("channel", "scalar", "float")[i % 3], sample=True, seed=i)
            check_against_reference("cuda", t, kw, tol_for("cuda", dtype))
            n += 1
    # a strided (sliced) x and dy, and a refusal raised from inside the glue
    x = torch.randn(12, 100)[:, 10:90].requires_grad_(True)
    wd, wu = torch.randn(6, 80, requires_grad=True), torch.randn(80, 6, requires_grad=True)
    y = af.fused_adapter(x, wd, None, wu, None, skip=x, backend="cuda")
    y.backward(torch.randn(12, 160)[:, ::2])
    try:
        mod.fwd(torch.randn(4, 8), torch.randn(3, 8), torch.randn(5), torch.randn(8, 3), None, None, 1.0, None,
                False, None, 1, 2, torch.empty(4, 8), torch.empty(4, 3))
        raise SystemExit("a bad b_down was not refused")
    except RuntimeError as e:
        assert "b_down has shape" in str(e), e
    print(f"sanitized: {n} cases and the strided / refusal checks passed")
""")


MUTANT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import adapterfuse as af
    from adapterfuse.ops import _emulation, _extension

    mod = _emulation.build(Path(sys.argv[1]), kernels=Path(sys.argv[2]), name="adapterfuse_emu_sanitized_mutant",
                           extra_cflags=_emulation.SANITIZE_CFLAGS, extra_ldflags=_emulation.SANITIZE_LDFLAGS)
    _extension.load_for = lambda backend: mod
    x = torch.randn(5, 37)  # d = 37 fp32: the last 16-byte chunk of each row goes through the scalar loads
    af.fused_adapter(x, torch.randn(4, 37), None, torch.randn(37, 4), None, backend="cuda")
    print("no finding")
""")


def _run(script, *args):
    tests = Path(__file__).resolve().parent
    env = dict(os.environ)
    env.update({
        _emulation.ENV: "1",
        "LD_PRELOAD": _emulation.asan_runtime(),
        # python and torch allocate memory they never free on purpose; findings in the extension stay fatal
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:alloc_dealloc_mismatch=0",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")]),
    })
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=1500)


def test_emulation_under_asan_and_ubsan(tmp_path):
    proc = _run(SCRIPT, tmp_path / "build")
    log = proc.stdout[-3000:] + "\n" + proc.stderr[-8000:]
    assert proc.returncode == 0, f"the sanitized emulation failed (rc {proc.returncode}):\n{log}"
    assert "sanitized: 10 cases" in proc.stdout, log
    for finding in ("ERROR: AddressSanitizer", "runtime error:"):
        assert finding not in proc.stderr, log


def test_asan_catches_an_out_of_bounds_read(tmp_path):
    """The sanitizer build must see a real bug: the tile loader reading one element past each row (gc + v <=
    cols) reads past the end of x on its last row, which ASan reports as a heap-buffer-overflow."""
    src = (_emulation.csrc_dir() / "adapter_kernels.cu").read_text()
    old, new = "(gr < rows && gc + v < cols) ?", "(gr < rows && gc + v <= cols) ?"
    assert src.count(old) == 1, "mutation site not found"
    cu = tmp_path / "adapter_kernels.cu"
    cu.write_text(src.replace(old, new))
    proc = _run(MUTANT, tmp_path / "build", cu)
    assert proc.returncode != 0 and "no finding" not in proc.stdout, "ASan missed an out-of-bounds read"
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-4000:]
