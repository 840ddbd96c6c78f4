#!/usr/bin/env bash
# On this workplace's lent GPU machine (no network; CUDA and PyTorch in its python3, no Flower or Ray):
# install the parts of .gpu-bundle/ (made here by `python experiments/gpu_bundle.py`) that came with
# this call, and with `run`, once every part is in, run experiments/bench_gpu.py.
#
# One call per part on one warm machine (parts stay between calls while it is warm):
#   bash experiments/bench_gpu_device.sh install            (carry .gpu-bundle/a)
#   bash experiments/bench_gpu_device.sh run [ARGS...]      (carry .gpu-bundle/b; ARGS go to bench_gpu.py)
# The results (results.md, results.jsonl, and the runs' logs and metrics as runs.tgz) land in $OUT.
set -euo pipefail
mode=${1:-}
case "$mode" in install | run) shift ;; *) echo "usage: bash $0 install|run [bench_gpu.py arguments]" >&2; exit 2 ;; esac
PYTHON=${PYTHON:-python3}
SITE=${MEKD_FL_SITE:-/opt/mekd-fl/site}
export MEKD_FL_DATA=${MEKD_FL_DATA:-/opt/mekd-fl/data}
mkdir -p "$SITE" "$MEKD_FL_DATA"
BUNDLE=${MEKD_FL_BUNDLE:-.gpu-bundle}
for part in "$BUNDLE"/*/; do
  name=$(basename "$part")
  [ -f "$SITE/.part-$name" ] && continue
  if compgen -G "${part}*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$part"*.whl
  fi
  for xz in "$part"data/*.xz; do
    [ -e "$xz" ] || continue
    "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$xz" "$MEKD_FL_DATA/$(basename "$xz" .xz)"
  done
  cp "${part}PARTS" "$SITE/PARTS"
  touch "$SITE/.part-$name"
  echo "[gpu-device] part $name installed"
done
[ "$mode" = install ] && exit 0
[ -f "$SITE/PARTS" ] || { echo "[gpu-device] no bundle part has come: carry .gpu-bundle/<part> (experiments/gpu_bundle.py)" >&2; exit 3; }
for name in $(cat "$SITE/PARTS"); do
  [ -f "$SITE/.part-$name" ] || { echo "[gpu-device] part $name is not on this machine (a fresh one?): carry .gpu-bundle/$name in a call first" >&2; exit 3; }
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
results=${BENCH_GPU_OUT:-/tmp/bench-gpu}
status=0
"$PYTHON" experiments/bench_gpu.py --out "$results" "$@" || status=$?
if [ -n "${OUT:-}" ]; then
  cp "$results"/results.md "$results"/results.jsonl "$OUT"/ 2>/dev/null || true
  tar czf "$OUT/runs.tgz" -C "$results" --exclude='*.pt' . || true
fi
exit $status
