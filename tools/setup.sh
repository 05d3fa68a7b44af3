#!/usr/bin/env bash
# Set up fxsparse in this checkout: everything the main job (`fxsparse train`) and the tests need.
#   1. the built-in data, Fashion-MNIST, from Debian's package dataset-fashion-mnist (files under
#      /usr/share/datasets/fashion-mnist): apt-get as root, or through sudo otherwise;
#   2. a virtual environment .venv with fxsparse installed editable and its test tools: pip install -e ".[test]".
# Usage: bash tools/setup.sh [--no-data]     (--no-data: skip step 1; torchvision downloads the data instead)
# Safe to run again: what is already there is kept. Any failure stops it with a message saying what to do.
# PYTHON=python3.12 bash tools/setup.sh picks the interpreter of the environment (Python >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_PACKAGE=dataset-fashion-mnist
PYTHON=${PYTHON:-python3}
VENV=.venv

say() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }

install_data() {
    if command -v dpkg-query >/dev/null 2>&1 \
        && dpkg-query -W -f='${Status}' "$DATA_PACKAGE" 2>/dev/null | grep -q "ok installed"; then
        say "$DATA_PACKAGE is installed"
        return
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get here (not Debian or Ubuntu; macOS, say): Fashion-MNIST is not installed as a package."
        say "  The first \`fxsparse train\` downloads it with torchvision into ./data (needs the internet);"
        say "  offline, put the four *-ubyte.gz files in a folder and pass --data-dir FOLDER."
        return
    fi
    local sudo=""  # a plain word, not an array: bash 3 (macOS) and set -u
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || fail "installing $DATA_PACKAGE needs root, and there is no sudo.
  Ask an administrator to run: apt-get update && apt-get install -y $DATA_PACKAGE
  then run this script again; or run it with --no-data and let torchvision download the data (needs the internet)."
        sudo=sudo
        say "installing $DATA_PACKAGE with sudo (it may ask for your password)"
    fi
    $sudo apt-get update -q || fail "apt-get update failed (see above); fix it, or run this script with --no-data"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$DATA_PACKAGE" \
        || fail "apt-get install $DATA_PACKAGE failed (see above; the package is in Debian 12 and later);
  run this script with --no-data to skip it and let torchvision download the data (needs the internet)"
}

install_venv() {
    command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found; install Python >= 3.10, or name it: PYTHON=python3.12 bash tools/setup.sh"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || fail "fxsparse needs Python >= 3.10; $PYTHON is $("$PYTHON" -V 2>&1). Name another: PYTHON=python3.12 bash tools/setup.sh"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV with $("$PYTHON" -V 2>&1)"
        "$PYTHON" -m venv "$VENV" || fail "$PYTHON -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    say "pip install -e \".[test]\" into $VENV (torch, torchvision, timm and the test tools)"
    "$VENV/bin/python" -m pip install -e ".[test]" || fail "pip install failed (see above)"
}

case "${1:-}" in
    "") install_data ;;
    --no-data) say "skipping $DATA_PACKAGE (--no-data)" ;;
    *) fail "unknown option ${1}; usage: bash tools/setup.sh [--no-data]" ;;
esac
install_venv
say "done. The main job: $VENV/bin/fxsparse train    The tests: $VENV/bin/python -m pytest -q"
