"""pytest-benchmark suite of the fused paths (kernel regression CI), separate from tests/:

    python -m pytest benchmarks --benchmark-autosave                      # record a run
    python -m pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%

Without a GPU the Triton kernels would run under the interpreter, which is not worth timing, so the
Triton cases need CUDA; the CPU extension cases run everywhere."""
