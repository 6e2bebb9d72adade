#!/usr/bin/env bash
# Everything a lent GPU session does, in two device calls (each < 10 minutes), installing nothing:
#   bash tools/gpu_session.sh tests   # whole test suite without the interpreter (bf16 included),
#                                          # the CUDA extension build, compute-sanitizer memcheck/racecheck/synccheck
#   bash tools/gpu_session.sh bench   # the full benchmark suite (JSON + PNG)
# Output goes under $OUT (the device tool brings it back); copy the JSON/PNG to benchmarks/results/.
set -uo pipefail
stage=${1:-tests}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ADAPTERFUSE_EXT_DIR=/tmp/adapterfuse_ext
unset TRITON_INTERPRET
python3 -m adapterfuse.info 2>&1 | tee "$OUT/info.txt"
if [ "$stage" = tests ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/info.txt"
  # Triton compiles one kernel per constexpr combination on a fresh machine: spread that over workers
  par=""; python3 -c "import xdist" 2>/dev/null && par="-n 8"
  timeout 420 python3 -m pytest tests -q -p no:cacheprovider $par --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/tests.txt" | tail -25
  for tool in memcheck racecheck synccheck; do
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/sanitize_cuda.py \
      > "$OUT/sanitizer-$tool.txt" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.txt") clean summaries)"
  done
else
  timeout 560 python3 -m adapterfuse.bench --out "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -60
fi
