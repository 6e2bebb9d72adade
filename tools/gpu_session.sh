#!/usr/bin/env bash
# Everything a lent GPU session does (issue 15), each stage one device call that ends inside the tool's 600 s
# limit (GPU_SESSION_LIMIT, default 570 s, counted from the script's start) and installs nothing: the device
# image already has torch, triton, pytest (xdist, timeout, benchmark), hypothesis, transformers, timm, peft and
# matplotlib. Everything it writes goes under $OUT (the device tool brings back at most 8 files).
#   bash tools/gpu_session.sh tests          # the extension build (timed), the whole test suite without the
#                                            # interpreter (bf16 included), compute-sanitizer memcheck / racecheck /
#                                            # synccheck over the CUDA backend
#   bash tools/gpu_session.sh bench [ARGS]   # adapterfuse-bench under a time budget (the JSON lists what it skipped;
#                                            # ARGS narrow a follow-up run, e.g. --no-model --dtypes float16 float32)
#   bash tools/gpu_session.sh profile        # Nsight Compute over one fused call per case (tools/profile_kernels.py):
#                                            # time, DRAM / SM throughput, registers, occupancy per kernel
# Copy the JSON / PNG to benchmarks/results/ with the GPU's name in the file name.
set -uo pipefail
stage=${1:-tests}
shift || true
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
limit=${GPU_SESSION_LIMIT:-570}
left() { echo $((limit - SECONDS)); }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ADAPTERFUSE_EXT_DIR=/tmp/adapterfuse_ext
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|transformers|timm|torchvision|peft|hypothesis|pytest[a-z-]*|ninja|pybind11|matplotlib) '
  python3 -m adapterfuse.info
} > "$OUT/info.txt" 2>&1
tail -n 30 "$OUT/info.txt"

if [ "$stage" = tests ]; then
  # 1. the C++/CUDA extension, once, before the test workers start (they would wait on its build lock)
  SECONDS_BUILD=$SECONDS
  timeout $(($(left) - 300)) python3 -c "
from adapterfuse.ops import _extension as e
m = e.load()
print('extension built:', dict(m.build_info()))" > "$OUT/build.txt" 2>&1
  echo "extension build: exit $? in $((SECONDS - SECONDS_BUILD)) s ($(tail -n 1 "$OUT/build.txt" | cut -c1-300))"
  # 2. the test suite: workers over the CPU cores (work stealing where xdist has it: the CPU-only emulation / ASan
  # tests take minutes each), one test at most 300 s, the whole run leaving 150 s for step 3. Triton compiles
  # each specialisation once per machine (~1100 distinct ones counted in a CPU run of the suite, ~0.6 s each).
  par=""
  python3 -c "import xdist" 2>/dev/null && par="-n $(( $(nproc) > 12 ? 12 : $(nproc) ))"
  python3 -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" 2>/dev/null \
    && par="$par --dist worksteal"
  per_test=""
  python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 300"
  timeout $(($(left) - 150)) python3 -m pytest tests -q -p no:cacheprovider $par $per_test -rfE --durations=15 \
    --junitxml="$OUT/junit.xml" > "$OUT/tests.txt" 2>&1
  echo "pytest: exit $? (124: stopped by the time limit)"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | cut -c1-220 | head -40
  tail -n 3 "$OUT/tests.txt"
  # 3. compute-sanitizer over the CUDA backend's forward and backward, each tool a third of what is left
  for tool in memcheck racecheck synccheck; do
    budget=$(( ($(left) - 5) / 3 ))
    [ "$tool" = racecheck ] && budget=$(( $(left) / 2 ))
    [ "$tool" = synccheck ] && budget=$(( $(left) - 5 ))
    if [ "$budget" -lt 20 ]; then echo "compute-sanitizer $tool: skipped (no time left)"; continue; fi
    timeout "$budget" compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/sanitize_cuda.py \
      > "$OUT/sanitizer-$tool.txt" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.txt") clean" \
         "summaries; $(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer-$tool.txt"))"
  done
elif [ "$stage" = profile ]; then
  # the benchmark's bf16 shapes at the smallest and largest rank, both backends, forward and training
  for shape_r in "vit_b16 8" "vit_b16 64" "llama7b_8k 8" "llama7b_8k 64"; do
    for backend in triton cuda; do
      for mode in fwd train; do
        if [ "$(left)" -lt 45 ]; then echo "profile: no time left for $shape_r $backend $mode"; continue; fi
        read -r shape r <<< "$shape_r"
        echo "# case $shape r=$r bfloat16 $backend $mode" >> "$OUT/ncu.csv"
        timeout $(($(left) - 15)) ncu --profile-from-start off --clock-control none --csv --page details \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
          python3 tools/profile_kernels.py --shape "$shape" --r "$r" --backend $backend --mode $mode \
          >> "$OUT/ncu.csv" 2>> "$OUT/ncu-stderr.txt"
        echo "ncu $shape r=$r $backend $mode: exit $?"
      done
    done
  done
  python3 tools/profile_kernels.py --summarize "$OUT/ncu.csv" | tee "$OUT/ncu-summary.txt" | cut -c1-400
else
  timeout $(($(left) - 10)) python3 -m adapterfuse.bench --out "$OUT" --time-budget $(($(left) - 90)) "$@" \
    > "$OUT/bench.txt" 2>&1
  echo "adapterfuse-bench: exit $?"
  grep -E "^(FAILED|time budget)" "$OUT/bench.txt" | cut -c1-300
  tail -n 70 "$OUT/bench.txt" | cut -c1-160
fi
echo "gpu_session $stage: $SECONDS s"
