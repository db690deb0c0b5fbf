#!/usr/bin/env bash
# `make gpu-check`, for the lent GPU machine (its own python3/torch/triton, nvcc, no
# network, no venv): build in place for sm_90, run the whole suite (the `gpu` tests
# run there), then the CUDA benchmarks. Logs and results go to $OUT (or
# benchmarks/results). Budget: under 8 minutes. GPU_CHECK_QUICK=1 skips the CPU-only tests,
# GPU_CHECK_ONLY=fam1,fam2 limits the benchmarks to those families, GPU_CHECK_TUNE=1 also
# times the box IoU tile configs and the cross-entropy block sizes (benchmarks/tune_*.py,
# ~1.5 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
rc=0
step() { echo "== $1 ($(date +%T))"; }

step env
{ nvidia-smi; $PY -c "import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

step build
# Python files as an editable install (maps pyvision_ops.kernels), then _C in place.
PYVISION_OPS_NO_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || ln -sfn ../kernels pyvision_ops/kernels
$PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -m pyvision_ops | tee -a "$OUT/env.txt"

step "gpu tests"
# -v: one line per test as it ends, so a run cut by the timeout still says how far it got
timeout 200 $PY -m pytest tests -m gpu -v -rfE --durations=15 -p no:cacheprovider > "$OUT/tests.log" 2>&1 || rc=1
tail -15 "$OUT/tests.log"
step "other tests"
[ -n "${GPU_CHECK_QUICK:-}" ] && echo "skipped (GPU_CHECK_QUICK)" || timeout 200 $PY -m pytest tests -m "not gpu" -q -rfE -p no:cacheprovider >> "$OUT/tests.log" 2>&1 || rc=1
tail -8 "$OUT/tests.log"

step bench
timeout 240 $PY -m benchmarks.run --device cuda --out "$OUT" ${GPU_CHECK_ONLY:+--only "$GPU_CHECK_ONLY"} > "$OUT/bench.log" 2>&1 || rc=1
tail -30 "$OUT/bench.log"
if [ -n "${GPU_CHECK_TUNE:-}" ]; then
  step "tune box_iou"
  timeout 120 $PY -m benchmarks.tune_box_iou > "$OUT/tune_box_iou.log" 2>&1 || rc=1
  cat "$OUT/tune_box_iou.log"
  step "tune cross_entropy"
  timeout 60 $PY -m benchmarks.tune_cross_entropy > "$OUT/tune_cross_entropy.log" 2>&1 || rc=1
  cat "$OUT/tune_cross_entropy.log"
fi
step done
exit $rc
