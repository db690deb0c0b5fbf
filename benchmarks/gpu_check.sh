#!/usr/bin/env bash
# `make gpu-check`, for the lent GPU machine (its own python3/torch/triton, nvcc, no
# network, no venv): build in place for sm_90, run the whole suite (the `gpu` tests
# run there), then the CUDA benchmarks. Results go to $OUT (or benchmarks/results), the
# logs too (packed into $OUT/logs.tgz when $OUT is set). Budget: GPU_CHECK_BUDGET seconds
# (default 480), each step cut to what is left.
# GPU_CHECK_QUICK=1 skips the CPU-only tests, GPU_CHECK_TESTS="tests/test_a.py ..." limits
# the GPU tests to those paths, GPU_CHECK_ONLY=fam1,fam2 the benchmarks to those families,
# GPU_CHECK_TUNE=1 also times the box IoU tile configs, the cross-entropy configs
# (benchmarks/tune_*.py, up to 2 and 3 minutes) and Soft-NMS per selection with each CUDA kernel
# variant (benchmarks/soft_nms_scaling.py, seconds); GPU_CHECK_TUNE=box_iou,soft_nms (any of
# box_iou, cross_entropy, soft_nms, ce_rows: tune_cross_entropy.py --rows) only those. GPU_CHECK_SANITIZE=1 runs the CUDA C++
# kernels under compute-sanitizer's racecheck (up to 180 s), synccheck and memcheck (60 s
# each), then the Triton kernels under memcheck (120 s), after the tuners
# (benchmarks/sanitize.py); GPU_CHECK_SANITIZE=racecheck,memcheck (say) only those.
# On the H200
# (2026-11-27) GPU_CHECK_TUNE=1 GPU_CHECK_QUICK=1 took 232 s, start not counted, before
# the overhead and profile steps were added (expected ~1.5 minutes more).
# PYVISION_OPS_COMMIT=<rev> names the commit in the results (the lent machine's copied tree
# has no .git, or the session-start checkout's).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
rc=0
step() { echo "== $1 ($(date +%T))"; }
# One deadline for the whole check (a device command may run 600 s): each step's timeout is
# what it asks for or what is left, less 20 s to pack the logs.
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-480} ))
t() { local left=$(( DEADLINE - $(date +%s) - 20 )); echo $(( left < 1 ? 1 : ($1 < left ? $1 : left) )); }
# The device tool returns at most 8 files: logs go back as one archive, also after a kill.
pack() {
  if [ "$OUT" != benchmarks/results ]; then
    (cd "$OUT" && tar czf logs.tgz ./*.log env.txt 2>/dev/null && rm -f ./*.log env.txt)
  fi
}
trap pack EXIT
trap 'exit 143' TERM INT

step env
{ nvidia-smi; $PY -c "import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

step build
# Python files as an editable install (maps pyvision_ops.kernels), then _C in place.
PYVISION_OPS_NO_EXT=1 timeout $(t 120) $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || ln -sfn ../kernels pyvision_ops/kernels
timeout $(t 300) $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -m pyvision_ops | tee -a "$OUT/env.txt"

# pytest-xdist where present: a test that crashes the interpreter fails alone instead of
# ending the run. -v: one line per test as it ends, so a run cut by its timeout still names
# its failures (the summary comes last).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n")
step "gpu tests"
timeout $(t 200) $PY -m pytest ${GPU_CHECK_TESTS:-tests} -m gpu ${XDIST:+$XDIST 4} -v --tb=short -rfE -p no:cacheprovider > "$OUT/tests.log" 2>&1 || rc=1
grep -E "FAILED|crashed" "$OUT/tests.log" | sort -u | head -20; tail -1 "$OUT/tests.log"
step "other tests"
if [ -n "${GPU_CHECK_QUICK:-}" ]; then
  echo "skipped (GPU_CHECK_QUICK)"
else
  timeout $(t 240) $PY -m pytest tests -m "not gpu" ${XDIST:+$XDIST 12} -v --tb=short -rfE -p no:cacheprovider > "$OUT/tests_cpu.log" 2>&1 || rc=1
  grep -E "FAILED|crashed" "$OUT/tests_cpu.log" | sort -u | head -20; tail -1 "$OUT/tests_cpu.log"
fi

step bench
timeout $(t 240) $PY -m benchmarks.run --device cuda --out "$OUT" ${GPU_CHECK_ONLY:+--only "$GPU_CHECK_ONLY"} > "$OUT/bench.log" 2>&1 || rc=1
tail -30 "$OUT/bench.log"
tune() { [ "${GPU_CHECK_TUNE:-}" = 1 ] || [[ ",${GPU_CHECK_TUNE:-}," == *",$1,"* ]]; }
# the short one first: a tight budget cuts the tuners, not it
if tune soft_nms; then
  step "soft_nms scaling"
  timeout $(t 90) $PY -m benchmarks.soft_nms_scaling > "$OUT/soft_nms_scaling.log" 2>&1 || rc=1
  cat "$OUT/soft_nms_scaling.log"
fi
if tune ce_rows; then  # the [N, C] row kernels' tiles, and rows as class planes
  step "tune cross_entropy rows"
  timeout $(t 90) $PY -m benchmarks.tune_cross_entropy --rows > "$OUT/tune_ce_rows.log" 2>&1 || rc=1
  cat "$OUT/tune_ce_rows.log"
fi
if tune box_iou; then
  step "tune box_iou"
  timeout $(t 120) $PY -m benchmarks.tune_box_iou > "$OUT/tune_box_iou.log" 2>&1 || rc=1
  cat "$OUT/tune_box_iou.log"
fi
if tune cross_entropy; then
  step "tune cross_entropy"
  timeout $(t 180) $PY -m benchmarks.tune_cross_entropy > "$OUT/tune_cross_entropy.log" 2>&1 || rc=1
  cat "$OUT/tune_cross_entropy.log"
fi
if [ -n "${GPU_CHECK_SANITIZE:-}" ]; then
  # each CUDA C++ kernel once under compute-sanitizer (benchmarks/sanitize.py), racecheck
  # first: shared-memory races are what the CPU-thread simulator cannot show; then the
  # Triton kernels under memcheck (their first compiles take most of that run)
  step sanitize
  CS=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  san() {  # san <log name> <seconds> <tool> [sanitize.py arguments]
    local name=$1 secs=$2 tool=$3
    shift 3
    timeout $(t "$secs") "$CS" --tool "$tool" --error-exitcode 1 $PY -m benchmarks.sanitize "$@" \
      > "$OUT/sanitize_$name.log" 2>&1 && echo "$name: clean" \
      || { rc=1; echo "$name: FAILED or cut"; grep -E "Error|Hazard|====" "$OUT/sanitize_$name.log" | head -8; }
  }
  # GPU_CHECK_SANITIZE=1: all four; a list (racecheck,synccheck,memcheck,memcheck_triton) only
  # those. Racecheck got through 7 of the CUDA cases in 60 s on the H200 (2026-11-28).
  sanitize() { [ "$GPU_CHECK_SANITIZE" = 1 ] || [[ ",$GPU_CHECK_SANITIZE," == *",$1,"* ]]; }
  if sanitize racecheck; then san racecheck 180 racecheck; fi
  if sanitize synccheck; then san synccheck 60 synccheck; fi
  if sanitize memcheck; then san memcheck 60 memcheck; fi
  if sanitize memcheck_triton; then san memcheck_triton 120 memcheck --triton; fi
fi
step overhead
timeout $(t 60) $PY -m benchmarks.overhead --device cuda > "$OUT/overhead.log" 2>&1 || rc=1
cat "$OUT/overhead.log"
step profile
timeout $(t 150) $PY -m benchmarks.profile_cuda ${GPU_CHECK_ONLY:+--only "$GPU_CHECK_ONLY"} > "$OUT/profile.log" 2>&1 || rc=1
grep -E "^### |host" "$OUT/profile.log" | cut -c1-110
step done
exit $rc
