#!/usr/bin/env bash
# Run every benchmark and print their markdown tables (also saved to
# $CAM_CAFFE_BENCH_DIR/results.md, default /tmp/cam-caffe-bench/results.md).
#
#   benchmarks/run_all.sh [--quick] [--max-load L]
#
# --max-load L  first wait until the 1-minute load average is below L (default 0.3;
#               0 = do not wait), so that other jobs do not share the cores.
# --quick       smaller runs (16 images instead of 64, 200 instead of 2,000, …):
#               a smoke test of the scripts, not numbers to report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
[ -x "$PY" ] || PY=python3
MAX_LOAD=0.3
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --max-load) MAX_LOAD=$2; shift ;;
    *) echo "usage: $0 [--quick] [--max-load L]" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR=${CAM_CAFFE_BENCH_DIR:-${TMPDIR:-/tmp}/cam-caffe-bench}
mkdir -p "$OUT_DIR"
unset CAM_CAFFE_BENCH_MAX_LOAD      # wait once here, not before every script

if [ "$MAX_LOAD" != 0 ]; then
  (cd benchmarks && "$PY" -c "import sys; from common import wait_for_quiet; \
wait_for_quiet(float(sys.argv[1]))" "$MAX_LOAD")
fi

if [ "$QUICK" = 1 ]; then
  ARGS_PEAK="--sizes 1024,2048 --repeat 3"; ARGS_CAM="--repeat 3"
  ARGS_ORIG="--images 8 --repeat 1"; ARGS_STAGES="--images 32 --repeat 1"
  ARGS_FWD="--quick --batches 1,8"; ARGS_MEM="--large 200 --small 20 --repeat 1"
  ARGS_DEMO="--images 12 --repeat 1"; ARGS_METHODS="--images 4 --repeat 1 --models demo"
  ARGS_DASK="--images 32 --repeat 1"
else
  ARGS_PEAK=""; ARGS_CAM=""; ARGS_ORIG=""; ARGS_STAGES=""; ARGS_FWD=""; ARGS_MEM=""; ARGS_DEMO=""
  ARGS_METHODS=""; ARGS_DASK=""
fi

{
  echo "# cam-caffe benchmarks"
  cd benchmarks
  # shellcheck disable=SC2086
  "$PY" sgemm_peak.py $ARGS_PEAK
  "$PY" bench_cam.py $ARGS_CAM
  "$PY" bench_forward.py $ARGS_FWD
  "$PY" bench_stages.py $ARGS_STAGES
  "$PY" bench_original.py $ARGS_ORIG
  "$PY" bench_memory.py $ARGS_MEM
  "$PY" bench_demo.py $ARGS_DEMO
  "$PY" bench_methods.py $ARGS_METHODS
  "$PY" bench_dask.py $ARGS_DASK
} | tee "$OUT_DIR/results.md"
