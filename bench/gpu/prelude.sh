# Sourced by the GPU scripts (`source "$(dirname "$0")/prelude.sh" "$@"`): OUT (from $1, created,
# absolute), ROOT (the repository) as the working directory, and the environment. From the
# repository root `python3 -m sdiff...` imports this checkout as installed (sdiff's import hook
# maps kernels/, bench/ and ablations/ into it): nothing to install or copy on a bare GPU image.
OUT=${1:?usage: $0 OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
# the commit, for a copied tree without .git (sdiff.util.provenance reads it there)
SDIFF_GIT_SHA=${SDIFF_GIT_SHA:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export SDIFF_GIT_SHA TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
