#!/usr/bin/env bash
# checkov on deploy/k8s as each overlay renders it (plus the index Job), with the skips listed in
# deploy/k8s/checkov.yaml. checkov pins its own dependency versions, so it lives in a venv of its
# own (.venv-checkov, made on first use from the package registry), never in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-checkov
CHECKOV_VERSION=3.3.30
if ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
  echo "checkov.sh: installing checkov $CHECKOV_VERSION in $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "checkov==$CHECKOV_VERSION" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for overlay in deploy/k8s/overlays/*/; do
  kubectl kustomize "$overlay" > "$out/$(basename "$overlay").yaml"
done
cp deploy/k8s/jobs/*.yaml "$out/"
"$VENV/bin/checkov" --config-file deploy/k8s/checkov.yaml --directory "$out" "$@"
