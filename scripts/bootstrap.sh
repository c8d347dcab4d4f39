#!/usr/bin/env bash
# Set up .venv/ on a fresh machine: torch first (the pinned CUDA build also runs on CPUs), then
# the project with its dev tools. Safe to run again; `make` only calls it when pyproject changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python >= 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# segment-anything imports torchvision; this pair is the one that works together here.
if ! "$VENV/bin/python" -c 'import torch, torchvision' 2>/dev/null; then
  echo "bootstrap: installing torch (a few minutes on first use)"
  pip install "torch==2.14.1" "torchvision==0.29.1"
fi

echo "bootstrap: installing procrop and its dependencies"
pip install -e ".[dev]"
"$VENV/bin/procrop" --help >/dev/null
echo "bootstrap: ready ($VENV/bin/procrop)"
