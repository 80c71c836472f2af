# Sourced by the GPU scripts (`source "$(dirname "$0")/assemble.sh" "$@"`): sets OUT (from $1,
# created, absolute) and ROOT (the repository), and assembles the package in a temporary SITE
# the way pyproject.toml maps it (sdiff/, with kernels/, bench/ and ablations/ inside), first on
# PYTHONPATH, so nothing needs installing on a bare GPU image. Commands that import sdiff must
# run from SITE, not ROOT: the repository's own sdiff/ lacks those folders and would shadow it.
OUT=${1:?usage: $0 OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=$(mktemp -d)
cp -r "$ROOT/sdiff" "$SITE/sdiff"
for pkg in kernels bench ablations; do cp -r "$ROOT/$pkg" "$SITE/sdiff/$pkg"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export GIT_SHA=${GIT_SHA:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
