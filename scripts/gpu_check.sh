#!/usr/bin/env bash
# GPU checks of the serving path, for a machine with a CUDA GPU (no gradio needed):
# the CUDA tests (graphed analyses equal eager ones, no cross-talk), then the benchmark twice.
#   scripts/gpu_check.sh [OUT]      (default runs/gpu)
set -uo pipefail
OUT=${1:-${OUT:-runs/gpu}}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_capture.py >"$OUT/pytest.log" 2>&1
echo "pytest exited with $?"; tail -25 "$OUT/pytest.log"
# --threads 4: the app's setting on a 16-core GPU machine (4 analyses at once, the cores shared out)
for i in 1 2; do
    timeout 150 $PY -m resnet_demo.tools.bench --device cuda --threads 4 --runs 300 --warmup 30 \
        --batch-sizes 1 32 256 1024 --json "$OUT/bench$i.json" || echo "bench $i failed (rc $?)"
done
