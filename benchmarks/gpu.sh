#!/usr/bin/env bash
# The accelerator measurements, in one go (a few minutes on one GPU):
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # default: runs/gpu_bench
#
# 1. the full train step of proxy_anchor and hpl_pa at SOP's 11,318 classes, ResNet-50, 224 px,
#    bf16 compute, batch 120 and 256: hdml_jax against the same step in PyTorch (channels_last,
#    bf16 autocast, torch.compile when it works), images/s, step time, peak memory, MFU
#    (benchmarks/train_step.py; torch and pytorch-metric-learning optional: without them only
#    hdml_jax is timed);
# 1b. the same for the ViT-S/16 recipe (configs/sop.py:...,backbone=vit_s16_dino, HIER's step),
#    bf16, batch 90 and 180 (train_step_vit.json);
# 2. retrieval_metrics at N = 60,502, d = 512 (SOP's test set size; benchmarks/retrieval.py);
# 2b. HIER's loss forward+backward, batch 90 and 180, 512 LCAs (benchmarks/hier_loss.py; the
#    official implementation timed on the CPU, as torch here has no accelerator build);
# 3. the input pipeline's images/s on this machine's CPU cores, by loader threads and by worker
#    processes (CUB-sized JPEGs, the proxy_anchor train transform; benchmarks/input.py): whether
#    they feed step 1.
#
# Needs a venv with jax for the accelerator (pip install -e . "jax[cuda12]"; TPU: "jax[tpu]");
# PYTHON overrides the interpreter (default: .venv/bin/python if present, else python3). Every
# table is printed and saved under OUT_DIR (train_step.json, *.txt), with the device description.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/runs/gpu_bench}
PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
cd "$ROOT"

echo "== device" | tee "$OUT/device.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PYTHON" -c 'import jax; print(jax.__version__, jax.devices())'; } | tee -a "$OUT/device.txt"

echo "== train step (hdml_jax vs PyTorch)"
"$PYTHON" benchmarks/train_step.py --batch 120 --batch 256 --json "$OUT/train_step.json" \
    2>&1 | tee "$OUT/train_step.txt"

echo "== train step, ViT-S/16 (hdml_jax vs PyTorch)"
"$PYTHON" benchmarks/train_step.py --backbone vit_s16 --batch 90 --batch 180 \
    --json "$OUT/train_step_vit.json" 2>&1 | tee "$OUT/train_step_vit.txt"

echo "== retrieval_metrics, N = 60,502"
"$PYTHON" benchmarks/retrieval.py --skip-faiss 2>&1 | tee "$OUT/retrieval.txt"

echo "== HIER's loss, B = 90 and 180"
"$PYTHON" benchmarks/hier_loss.py --repeats 5 2>&1 | tee "$OUT/hier_loss.txt"

echo "== input pipeline by threads and workers, $(nproc) CPUs"
CORES=$(nproc)
COUNTS=$(printf '%s\n' 0 $((CORES / 4)) $((CORES / 2)) "$CORES" | sort -nu | tr '\n' ' ')
# shellcheck disable=SC2086  # one argument per thread / worker count
"$PYTHON" benchmarks/input.py --repeats 5 --skip-tf --threads $COUNTS --workers $COUNTS 2>&1 | tee "$OUT/input.txt"

echo "results in $OUT"
