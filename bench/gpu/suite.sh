#!/usr/bin/env bash
# The prepared GPU run for training throughput and memory (< 8 minutes on one H100/H200):
#   bench/gpu/suite.sh OUTDIR
# Needs only torch and triton (the GPU image's); the package is assembled in a temporary folder
# (sdiff/, kernels/ as sdiff/kernels, bench/ as sdiff/bench: pyproject.toml's mapping).
# Writes versions.txt, nvidia-smi.txt, throughput.csv (+ .txt), memory_*.txt/json and a memory
# snapshot for https://pytorch.org/memory_viz.
set -uo pipefail
OUT=${1:?usage: bench/gpu/suite.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
SITE=$(mktemp -d)
cp -r "$ROOT/sdiff" "$SITE/sdiff"
cp -r "$ROOT/kernels" "$SITE/sdiff/kernels"
cp -r "$ROOT/bench" "$SITE/sdiff/bench"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export GIT_SHA=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
START=$(date +%s)
left() { echo $(( 450 - ($(date +%s) - START) )); }  # seconds of the 7.5-minute budget left

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch, triton; print('gpu', torch.cuda.get_device_name(0)); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee "$OUT/versions.txt"

# 1. throughput: tiny presets 64-512 eager vs compiled, then the paper presets at their sizes
timeout "$(left)" python -m sdiff.bench.throughput --presets uvit-tiny-32 unet-tiny-32 \
    --res 64 128 256 512 --batch 32 --compiled both --steps 10 --time-budget 120 \
    --csv "$OUT/throughput.csv" 2>&1 | tee "$OUT/throughput_tiny.txt"
timeout "$(left)" python -m sdiff.bench.throughput --presets uvit-l-256 --res 256 --batch 32 \
    --compiled both --steps 8 --time-budget 150 --csv "$OUT/throughput.csv" \
    2>&1 | tee "$OUT/throughput_uvit_l_256.txt"
timeout "$(left)" python -m sdiff.bench.throughput --presets uvit-l-512 unet-128 unet-256 \
    unet-512 --res 512 --batch 8 --steps 5 --time-budget 60 --csv "$OUT/throughput.csv" \
    2>&1 | tee "$OUT/throughput_paper.txt"

# 2. the 512 memory profile of U-ViT L: estimate and measurement, with and without checkpointing
for CK in "" "--checkpoint"; do
  timeout "$(left)" python -c "from sdiff.bench.memory import memory_main; raise SystemExit(memory_main())" \
      --model uvit-l-512 --res 512 --batch 16 $CK --budget-gib 80 --measure --json \
      --snapshot "$OUT/memory_snapshot${CK:+_ckpt}.pickle" \
      > "$OUT/memory${CK:+_ckpt}.json" 2> "$OUT/memory${CK:+_ckpt}.err"
  echo "memory $CK exit: $?"
done
rm -rf "$SITE"
echo "done in $(( $(date +%s) - START )) s"
