#!/usr/bin/env bash
# One prepared GPU run for the attention kernel: correctness tests on CUDA, then the benchmark.
#   bench/gpu/attention.sh OUTDIR
# Needs only torch, triton and pytest (the GPU image's); no install: the package is assembled
# in a temporary folder (sdiff/ plus kernels/ as sdiff/kernels, the mapping pyproject.toml makes).
# Writes: versions.txt, nvidia-smi.txt, kernel_tests.txt, attention.csv, attention.md, bench.txt.
set -uo pipefail
OUT=${1:?usage: bench/gpu/attention.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
SITE=$(mktemp -d)
cp -r "$ROOT/sdiff" "$SITE/sdiff"
cp -r "$ROOT/kernels" "$SITE/sdiff/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export GIT_SHA=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
cd "$ROOT"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python - > "$OUT/versions.txt" 2>&1 <<'PY'
import datetime, platform, torch, triton
print("date", datetime.datetime.now().isoformat(timespec="seconds"))
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("driver/cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("torch", torch.__version__, "triton", triton.__version__, "python", platform.python_version())
PY
cat "$OUT/versions.txt"

# 1. kernel tests on CUDA: the float64 grid (fp32/fp16/bf16, head dims 32/64/128, ragged and
#    cross/padded shapes), the mini-model test, and the long-sequence GPU tests
timeout 240 python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_kernels_attention.py tests/test_attention.py 2>&1 | tee "$OUT/kernel_tests.txt"
echo "kernel tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/kernel_tests.txt"

# 2. the benchmark: bf16, head dims 64 and 128, 256 to 16k tokens, fwd and fwd+bwd
timeout 330 python bench/bench_attention.py --csv "$OUT/attention.csv" \
    --markdown "$OUT/attention.md" 2>&1 | tee "$OUT/bench.txt"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
rm -rf "$SITE"
