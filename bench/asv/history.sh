#!/usr/bin/env bash
# Run the asv suite on START and on every commit of START..END, storing results per commit.
#
#   bench/asv/history.sh START END [asv run options]     e.g. history.sh HEAD~5 HEAD --quick
#
# The suite runs in the project's existing environment (asv.conf.json), where asv cannot check
# out or install other commits. So each commit is checked out with `git worktree add` (removed
# again), its packages are copied into bench/asv/.history/site the way pyproject.toml's
# package-dir lays them out (sdiff/; kernels/ -> sdiff/kernels; bench/ -> sdiff/bench; a commit
# without kernels/ or bench/ skips it), and asv runs the working tree's benchmarks through
# bench/asv/.history/python, a wrapper that runs the venv's interpreter as
#     PYTHONPATH=<site>:<venv site-packages> ASV_PYTHONPATH=<the same> python -S
# Without site processing the editable install's import hook never loads, so only the copy is
# importable; the venv itself is never modified. The wrapper's path is fixed, so every commit's
# results share one asv environment ("existing-py_..._bench_asv_.history_python"), distinct
# from the plain working-tree runs' ("existing-py_..._.venv_bin_python").
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 START END [asv run options]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
start=$(git -C "$repo" rev-parse --verify --quiet "$1^{commit}") || { echo "unknown revision $1" >&2; exit 2; }
end=$(git -C "$repo" rev-parse --verify --quiet "$2^{commit}") || { echo "unknown revision $2" >&2; exit 2; }
shift 2
commits="$start $(git -C "$repo" rev-list --reverse "$start..$end")"

scratch=$here/.history
site=$scratch/site
wrapper=$scratch/python
libs=$("$python" -c 'import sysconfig as s; p = s.get_paths(); print(":".join(dict.fromkeys([p["purelib"], p["platlib"]])))')
mkdir -p "$scratch"
# asv's benchmark runner drops PYTHONPATH's entries from sys.path unless ASV_PYTHONPATH is set
cat > "$wrapper" <<WRAPPER
#!/bin/sh
PYTHONPATH="$site:$libs" ASV_PYTHONPATH="$site:$libs" exec "$python" -S "\$@"
WRAPPER
chmod +x "$wrapper"

tree=$(mktemp -d)/tree
cleanup() {
    git -C "$repo" worktree remove --force "$tree" 2>/dev/null || true
    git -C "$repo" worktree prune
    rm -rf "$(dirname "$tree")"
}
trap cleanup EXIT

for commit in $commits; do
    git -C "$repo" worktree add --quiet --detach "$tree" "$commit"
    rm -rf "$site"
    mkdir -p "$site"
    cp -r "$tree/sdiff" "$site/sdiff"
    if [ -d "$tree/kernels" ]; then cp -r "$tree/kernels" "$site/sdiff/kernels"; fi
    if [ -d "$tree/bench" ]; then cp -r "$tree/bench" "$site/sdiff/bench"; rm -rf "$site/sdiff/bench/asv"; fi
    git -C "$repo" worktree remove --force "$tree"
    imported=$(cd "$scratch" && "$wrapper" -c 'import sdiff; print(sdiff.__file__)')
    if [ "$imported" != "$site/sdiff/__init__.py" ]; then
        echo "commit $commit: the wrapper imported sdiff from $imported, not $site" >&2
        exit 1
    fi
    echo "== $(git -C "$repo" log -1 --format='%h %s' "$commit")"
    (cd "$here" && "$python" -m asv run --environment "existing:$wrapper" --set-commit-hash "$commit" "$@")
done
