#!/usr/bin/env bash
# The prepared GPU checks in one run that fits 8 minutes (RUN_ALL_S, default 470 s, on one
# H100/H200):
#   bench/gpu/run_all.sh OUTDIR
# 1. bench/gpu/attention.sh (tune, kernel tests of both Triton attention kernels, the attention
#    benchmark with every backend, which writes a dispatch table), ~210 s;
# 2. bench/gpu/step_profile.py with what is left: the real training step of U-ViT L 256
#    (compiled, eager, fused Triton norms), U-Net 512 (the same) and U-ViT L 512 at batch 32
#    under checkpoint plans (measured peak beside the estimate), and torch.profiler tables of
#    the compiled U-ViT L 256 and U-Net 512 steps.
# The longer throughput grid (tiny presets at 64-512, paper presets) is bench/gpu/suite.sh,
# run on its own when a lease has the time (SUITE=1 here appends it).
# Wheels of packages the GPU image lacks (mlxtend) are installed from .whl/ when that folder is
# there. Everything goes to a temporary results/ folder, packed into OUTDIR/results.tgz (the
# device tool brings back at most 8 files); a log is the caller's (tee it into OUTDIR).
set -uo pipefail
OUT=${1:?usage: bench/gpu/run_all.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
RES="$WORK/results"
mkdir -p "$RES"
START=$(date +%s)
pack() { tar -C "$WORK" -czf "$OUT/results.tgz" results; echo "packed in $(( $(date +%s) - START )) s"; }
trap pack EXIT
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export SDIFF_GIT_SHA=${SDIFF_GIT_SHA:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
ATTN_TUNE_S=${ATTN_TUNE_S:-50} ATTN_TEST_S=${ATTN_TEST_S:-60} ATTN_BENCH_S=${ATTN_BENCH_S:-70} \
    ATTN_MASKED_S=${ATTN_MASKED_S:-30} bash "$ROOT/bench/gpu/attention.sh" "$RES/attention"
LEFT=$(( ${RUN_ALL_S:-470} - ($(date +%s) - START) - 15 ))
(cd "$ROOT" && timeout "$(( LEFT > 30 ? LEFT : 30 ))" python3 -m sdiff.bench.gpu.step_profile \
    --out "$RES/step" --time-budget "$(( LEFT > 60 ? LEFT - 40 : 20 ))" 2>&1 | tee "$RES/step.txt"
  echo "step profile exit: ${PIPESTATUS[0]}" | tee -a "$RES/step.txt")
if [ "${SUITE:-0}" = 1 ]; then
  SUITE_S=${SUITE_S:-330} bash "$ROOT/bench/gpu/suite.sh" "$RES/suite"
fi
echo "all done in $(( $(date +%s) - START )) s"
