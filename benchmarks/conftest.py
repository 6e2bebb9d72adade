"""pytest-benchmark suite of the fused paths (kernel regression CI), separate from tests/:

    python -m pytest benchmarks --benchmark-autosave                      # record a run
    python -m pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%

Without a GPU the Triton kernels would run under the interpreter, which is not worth timing, so the
Triton cases need CUDA; the CPU extension cases run everywhere."""

from adapterfuse.bench.timing import keep_freed_host_memory

_HOST_MALLOC = []


def pytest_configure(config):
    """Keep freed host memory, as adapterfuse-bench does on a CPU (README, Benchmarks): otherwise every [M, d] output
    of this shape (38.7 MiB in fp32) is mapped and faulted in afresh per call, which was most of a CPU timing."""
    _HOST_MALLOC.append(keep_freed_host_memory() or "default")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["host_malloc"] = _HOST_MALLOC[-1] if _HOST_MALLOC else "default"
