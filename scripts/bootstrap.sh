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

# System packages: redis-server (the local stack's broker; tests start their own) and Debian's
# docker-compose (validates docker-compose.yml without a Docker engine).
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]} (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts the packaged redis-server service where it can; the project runs its own.
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
