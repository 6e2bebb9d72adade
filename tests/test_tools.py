"""The GPU session's helpers run here too: tools/profile_kernels.py makes and runs its case on the CPU (no profiler
calls without a GPU) and its summary reads Nsight Compute's details-page CSV; tools/gpu_session.sh parses."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

from helpers import cpu_backends

ROOT = Path(__file__).resolve().parents[1]


def _profile_kernels():
    spec = importlib.util.spec_from_file_location("profile_kernels", ROOT / "tools" / "profile_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_profile_case_runs(backend, mode, capsys):
    mod = _profile_kernels()
    assert mod.main(["--shape", "llama7b_8k", "--m", "5", "--r", "3", "--dtype", "float32", "--backend", backend,
                     "--mode", mode, "--device", "cpu"]) == 0
    assert f"profiled: llama7b_8k M=5 d=4096 r=3 float32 {backend} {mode}" in capsys.readouterr().out


def test_ncu_summary_reads_the_details_csv(tmp_path, capsys):
    head = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",' \
           '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n'

    def row(i, kernel, section, name, unit, value):
        return f'"{i}","7","python3","h","{kernel}","1","7","(256, 1, 1)","(197, 1, 1)","0","9.0","{section}",' \
               f'"{name}","{unit}","{value}"\n'

    text = ("# case vit_b16 r=8 bfloat16 triton fwd\n" + "==PROF== Connected to process 7\n" + head
            + row(0, "adapter_fwd", "GPU Speed Of Light Throughput", "Duration", "usecond", "21.50")
            + row(0, "adapter_fwd", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "88.1")
            + row(0, "adapter_fwd", "Launch Statistics", "Registers Per Thread", "register/thread", "96")
            + row(0, "adapter_fwd", "Occupancy", "Achieved Occupancy", "%", "45.2")
            + "profiled: vit_b16 M=12608 d=768 r=8 bfloat16 triton fwd\n"
            + "# case vit_b16 r=8 bfloat16 cuda fwd\n" + head
            + row(0, "adapter_fwd_kernel<bf16>", "GPU Speed Of Light Throughput", "Duration", "usecond", "19.0")
            + row(1, "adapter_fwd_kernel<bf16>", "GPU Speed Of Light Throughput", "Duration", "usecond", "19.5"))
    path = tmp_path / "ncu.csv"
    path.write_text(text)
    mod = _profile_kernels()
    assert mod.main(["--summarize", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "case vit_b16 r=8 bfloat16 triton fwd"
    assert lines[1] == ("  adapter_fwd: grid (197, 1, 1) x block (256, 1, 1), time 21.50 usecond, DRAM % 88.1, "
                        "regs 96, occ % 45.2")
    assert lines[2] == "case vit_b16 r=8 bfloat16 cuda fwd" and len(lines) == 5  # one line per launch
    assert lines[4].endswith("time 19.5 usecond")


def test_gpu_session_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_session.sh")]).returncode == 0
