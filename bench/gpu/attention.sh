#!/usr/bin/env bash
# One prepared GPU run for the attention kernel: tune the launch configs, run the kernel tests
# on CUDA with the tuned configs, then the benchmark with them.
#   bench/gpu/attention.sh OUTDIR          (about 5 minutes on one H100/H200)
# Budgets in seconds (environment): ATTN_TUNE_S (100), ATTN_TEST_S (90), ATTN_BENCH_S (100),
# ATTN_MASKED_S (60).
# Needs only torch, triton and pytest (the GPU image's; pytest-xdist is used when present);
# no install: it runs from the repository root.
# Writes: versions.txt, nvidia-smi.txt, tune.csv, tuned.json, tune.txt, kernel_tests.txt,
# attention.csv, attention.md, attention_masked.csv, attention_dispatch.json (the measured
# dispatch table for `auto`), bench.txt. Copy tuned.json's winners into
# kernels/attention.py's LAUNCH_CONFIGS to make them the default.
set -uo pipefail
source "$(dirname "$0")/prelude.sh" "$@"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 - > "$OUT/versions.txt" 2>&1 <<'PY'
import datetime, platform, torch, triton
print("date", datetime.datetime.now().isoformat(timespec="seconds"))
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("torch", torch.__version__, "triton", triton.__version__, "python", platform.python_version())
PY
cat "$OUT/versions.txt"

# 1. tune: a few block/warp/stage candidates per kernel, head dim and length regime
(timeout "${ATTN_TUNE_S:-100}" python3 -m sdiff.bench.gpu.tune_attention --out "$OUT/tuned.json" \
    --csv "$OUT/tune.csv" --time-budget $(( ${ATTN_TUNE_S:-100} - 15 )) 2>&1 | tee "$OUT/tune.txt"
  echo "tune exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tune.txt")
if [ -s "$OUT/tuned.json" ]; then export SDIFF_ATTN_CONFIG="$OUT/tuned.json"; fi

# 2. kernel tests on CUDA with those configs: the float64 grid (fp32/fp16/bf16, head dims
#    32/64/128, ragged and cross/padded shapes), the mini-model test, the long-sequence tests
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4" || echo "")
(timeout "${ATTN_TEST_S:-90}" python3 -m pytest -q -p no:cacheprovider \
    -o addopts="" $XDIST tests/test_kernels_attention.py tests/test_kernels_attention_short.py \
    tests/test_attention.py tests/test_kernels_norm_modulate.py tests/test_kernels_groupnorm_silu.py \
    2>&1 | tee "$OUT/kernel_tests.txt"
  echo "kernel tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/kernel_tests.txt")

# 3. the benchmark: bf16, head dims 64 and 128, 256 to 16k tokens, fwd and fwd+bwd
(timeout "${ATTN_BENCH_S:-100}" python3 -m sdiff.bench.bench_attention --csv "$OUT/attention.csv" \
    --markdown "$OUT/attention.md" --write-table "$OUT/attention_dispatch.json" 2>&1 \
    | tee "$OUT/bench.txt"
  echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt")
# the same with padded keys (fwd+bwd), so masked calls get measured entries too; copy
# attention_dispatch.json into sdiff/models/ to make the measurements the dispatch table
(timeout "${ATTN_MASKED_S:-60}" python3 -m sdiff.bench.bench_attention --masked --modes fwd+bwd \
    --csv "$OUT/attention_masked.csv" --write-table "$OUT/attention_dispatch.json" 2>&1 \
    | tee -a "$OUT/bench.txt"
  echo "masked bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt")
