#!/usr/bin/env bash
# `make gpu-check`: confirms the CUDA kernels on a machine with a GPU, in one
# run of under 8 minutes (build included), with whatever CUDA torch is
# installed there (no network needed, no virtualenv made):
#   1. builds seqfuse in place for the local GPU's architecture only;
#   2. runs the CUDA tests (tests/test_devices.py on cuda, the first-call check);
#   3. compute-sanitizer memcheck and racecheck over a small run of every kernel;
#   4. the GPU benchmark table (benchmarks/gpu_table.py --quick).
# Writes a summary to $GPU_CHECK_OUT (default build/gpu-check, or $OUT when set)
# and exits non-zero if any step failed. Without a GPU it runs the CPU part
# (the build and the tests, which then skip their CUDA cases) and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${GPU_CHECK_OUT:-${OUT:-build/gpu-check}}
mkdir -p "$DEST"
SUMMARY="$DEST/summary.md"
export PYTHONUNBUFFERED=1
# The in-place build, whatever seqfuse may be installed (scripts under tools/
# and benchmarks/ would otherwise not see the repository's package).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step NAME TIMEOUT_S CMD...: runs, logs to $DEST/NAME.log, records the result
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$DEST/$name.log" 2>&1
  local rc=$?
  local verdict=ok; [ $rc -eq 0 ] || { verdict="FAILED (rc $rc)"; status=1; }
  echo "| $name | $verdict | $((SECONDS - t0)) s | \`$*\` |" >>"$SUMMARY"
  echo "gpu-check: $name: $verdict ($((SECONDS - t0)) s)"
  tail -n 25 "$DEST/$name.log"
  return $rc
}

HAVE_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "# seqfuse gpu-check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); print('GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1 | sed 's/^/    /'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/    /'
  echo
  echo "| step | result | time | command |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

if [ "$HAVE_GPU" = 1 ]; then
  ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  export SEQFUSE_USE_CUDA=1
else
  ARCH=${TORCH_CUDA_ARCH_LIST:-8.0}
  echo "gpu-check: no GPU here: building and testing the CPU part only"
fi
export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)}

if ! $PY -c "import ninja" 2>/dev/null && ! command -v ninja >/dev/null; then
  echo "gpu-check: ninja is missing: the build would run serially and overrun the time budget" | tee -a "$SUMMARY"
  exit 1
fi
# Step limits add up to under 8 minutes.
step build 210 env SEQFUSE_PTXAS_VERBOSE=1 $PY setup.py build_ext --inplace || { cat "$SUMMARY"; exit 1; }
# ptxas's resource report per kernel: registers, shared memory, stack, spills.
grep -E "^ptxas info +: (Used|Compiling entry)|bytes stack frame" "$DEST/build.log" >"$DEST/ptxas.txt" || true
kernels=$(grep -c "Compiling entry" "$DEST/ptxas.txt")
spilling=$(grep "bytes stack frame" "$DEST/ptxas.txt" | grep -vc "^ *0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
echo "| ptxas | $kernels kernel builds, $spilling with stack or spills | | ptxas.txt |" >>"$SUMMARY"
step tests 90 $PY -m pytest -q -x -p no:cacheprovider tests/test_devices.py tests/test_verify.py -rs
if [ "$HAVE_GPU" = 1 ]; then
  if command -v compute-sanitizer >/dev/null; then
    # Without the caching allocator, so out-of-bounds accesses are not hidden
    # inside its large segments; only seqfuse's kernels are instrumented.
    step memcheck 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
      --kernel-name kns=seqfuse $PY tools/cuda_smoke.py
    step racecheck 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --racecheck-report all \
      --error-exitcode 1 --kernel-name kns=seqfuse $PY tools/cuda_smoke.py
  else
    echo "| sanitizers | SKIPPED (no compute-sanitizer) | | |" >>"$SUMMARY"
  fi
  step bench 80 $PY benchmarks/gpu_table.py --quick --out "$DEST/gpu_table.md"
  [ -f "$DEST/gpu_table.md" ] && { echo; cat "$DEST/gpu_table.md"; } >>"$SUMMARY"
fi
echo
cat "$SUMMARY"
exit $status
