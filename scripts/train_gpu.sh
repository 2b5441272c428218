#!/usr/bin/env bash
# Train the shipped CIFAR-10 weights on one CUDA GPU and benchmark the app's model there.
#
#   scripts/train_gpu.sh [DATA] [OUT]
#
# DATA: the CIFAR-10 ImageFolder tarball (default data/cifar10-jpeg.tar.gz, a copy of
# ../shared/datasets/cifar10-jpeg.tar.gz); OUT: where weights, card, logs and bench.json go
# (default runs/gpu). Steps, each failing fast so a broken run costs little GPU time:
#   1. a 1-epoch smoke run of the tiny config on 2,048 images (does the CUDA path work at all?)
#   2. the GPU benchmark, before training, so nothing else shares the GPU while it times
#   3. the training run whose weights ship in weights/ (recipe below; docs/models.md)
set -uo pipefail
DATA=${1:-data/cifar10-jpeg.tar.gz}
OUT=${2:-${OUT:-runs/gpu}}
EPOCHS=${EPOCHS:-180}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$OUT/final" /tmp/smoke
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, torchvision, safetensors; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))" || exit 1

t0=$SECONDS
$PY -m resnet_demo.training.train --data "$DATA" --name smoke --config tiny --epochs 1 --limit 2048 --eval-limit 1000 \
    --cutout 12 --ema 0.999 --device cuda --out-dir /tmp/smoke --no-progress >"$OUT/smoke.log" 2>&1 \
    || { echo "smoke run failed:"; tail -40 "$OUT/smoke.log"; exit 1; }
echo "smoke run ok in $((SECONDS - t0)) s (includes decoding the data set once into data/cache)"

timeout 120 $PY -m resnet_demo.tools.bench --device cuda --runs 200 --warmup 20 --batch-sizes 1 32 256 1024 \
    --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1 || echo "bench failed or timed out (rc $?)"
cat "$OUT/bench.log"

t0=$SECONDS
timeout "${TRAIN_TIMEOUT:-420}" $PY -m resnet_demo.training.train --data "$DATA" --name cifar10_resnet --device cuda \
    --epochs "$EPOCHS" --batch-size 512 --lr 0.4 --wd 5e-4 --label-smoothing 0.2 --cutout 12 --ema 0.999 \
    --seed 0 --out-dir "$OUT/final" --no-progress >"$OUT/train.log" 2>&1
rc=$?
echo "training exited with $rc after $((SECONDS - t0)) s"
tail -15 "$OUT/train.log"
exit $rc
