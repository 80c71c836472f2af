#!/usr/bin/env bash
# Both prepared GPU checks in one run (attention kernel; throughput and memory), for a lease of a
# few minutes:
#   bench/gpu/run_all.sh OUTDIR          (about 9 minutes on one H100/H200)
# bench/gpu/attention.sh (tune, kernel tests, attention benchmark), then bench/gpu/suite.sh
# (throughput, memory) with what is left of RUN_ALL_S (default 520 s). Wheels of packages the
# GPU image lacks (mlxtend) are installed from .whl/ when that folder is there. Everything goes
# to a temporary results/ folder, packed into OUTDIR/results.tgz (the device tool brings back at most
# 8 files); a log is the caller's (tee it into OUTDIR).
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
ATTN_TUNE_S=${ATTN_TUNE_S:-80} ATTN_TEST_S=${ATTN_TEST_S:-75} ATTN_BENCH_S=${ATTN_BENCH_S:-90} \
    bash "$ROOT/bench/gpu/attention.sh" "$RES/attention"
SUITE_S=$(( ${RUN_ALL_S:-520} - ($(date +%s) - START) )) \
    bash "$ROOT/bench/gpu/suite.sh" "$RES/suite"
echo "all done in $(( $(date +%s) - START )) s"
