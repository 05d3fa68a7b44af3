#!/usr/bin/env bash
# The full check CI runs after the fast suite (run it after tools/setup.sh):
#   1. lint: ruff check, with the rules in pyproject.toml;
#   2. wheel: build the wheel, install it into a fresh environment outside the checkout with the LOWEST
#      versions pyproject.toml admits (tools/lowest_requirements.py: torch, torchvision, timm, ... at their
#      floors), and smoke-test it from outside the checkout (tools/smoke_installed.py: import, sparsify and
#      fold, the CLI, the shipped configs as package data);
#   3. lowest: the fast test suite in that environment, on the checkout's code.
# Every step runs; the summary names the ones that failed, and the exit code is 1 if any did.
# Usage: bash tools/check.sh
# The environment is made in a temporary folder and removed at the end (about 5 GB: torch's CUDA wheels);
# FXSPARSE_CHECK_DIR=DIR builds it in DIR and keeps it, and a later run re-uses it.
# PYTHON=python3.12 picks its interpreter: the oldest releases have no wheels for the newest Python.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
DEV=.venv/bin/python

say() { echo "check: $*"; }
[ -x "$DEV" ] || { say "error: no .venv in $ROOT: run bash tools/setup.sh first" >&2; exit 1; }
if [ -n "${FXSPARSE_CHECK_DIR:-}" ]; then
    WORK=$(mkdir -p "$FXSPARSE_CHECK_DIR" && cd "$FXSPARSE_CHECK_DIR" && pwd) || exit 1
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/fxsparse-check.XXXXXX") || exit 1
    trap 'rm -rf "$WORK"' EXIT
fi
case "$WORK/" in "$ROOT"/*) say "error: FXSPARSE_CHECK_DIR must be outside the checkout" >&2; exit 1 ;; esac
LOW=$WORK/venv

lint() {
    "$DEV" -m ruff check --output-format concise "$ROOT"
}

wheel() {
    rm -rf "$WORK/dist" "$ROOT/build" || return  # setuptools would pack stale files left in build/ into the wheel
    "$DEV" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT" || return
    local file
    file=$(ls "$WORK"/dist/fxsparse-*.whl) || return
    "$DEV" tools/lowest_requirements.py > "$WORK/lowest.txt" || return
    say "lowest versions: $(tr '\n' ' ' < "$WORK/lowest.txt")"
    if [ ! -x "$LOW/bin/python" ]; then
        "$PYTHON" -m venv "$LOW" || return
    fi
    "$LOW/bin/python" -m pip install -q --only-binary :all: -c "$WORK/lowest.txt" "$file[test]" || {
        say "installing the lowest versions failed: a floor in pyproject.toml may have no wheel for $("$PYTHON" -V 2>&1);"
        say "  try an older Python: PYTHON=python3.12 bash tools/check.sh"
        return 1
    }
    "$LOW/bin/python" -m pip install -q --no-deps --force-reinstall "$file" || return  # this build, if re-used
    "$LOW/bin/python" -m pip check || return
    (cd "$WORK" && "$LOW/bin/python" "$ROOT/tools/smoke_installed.py")
}

lowest() {
    [ -x "$LOW/bin/python" ] || { say "no environment with the lowest versions (the wheel step failed)"; return 1; }
    "$LOW/bin/python" -c 'import sys, torch, torchvision, timm, numpy
print(f"check: Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"timm {timm.__version__}, numpy {numpy.__version__}")' || return
    # python -m puts the current folder, the checkout, first on sys.path: the suite tests the checkout's code
    "$LOW/bin/python" -m pytest -q
}

failed=()
for step in lint wheel lowest; do
    echo
    say "== $step"
    start=$SECONDS
    if "$step"; then
        say "$step: passed ($((SECONDS - start)) s)"
    else
        say "$step: FAILED ($((SECONDS - start)) s)"
        failed+=("$step")
    fi
done
echo
if [ ${#failed[@]} -gt 0 ]; then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all passed: lint, wheel, lowest"
