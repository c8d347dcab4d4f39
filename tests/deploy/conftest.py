"""Fixtures of the Kubernetes tests: each overlay of deploy/k8s rendered by `kubectl kustomize`
(no cluster needed), and docker-compose.yml as written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
Manifest = dict[str, Any]


def render(overlay: str) -> list[Manifest]:
    """The objects `kubectl kustomize deploy/k8s/overlays/OVERLAY` renders."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with kustomize) is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Manifest]]:
    """Every overlay's objects, by overlay name."""
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml's services (images, build arguments, commands and health checks hold
    no variables, so plain YAML with merge keys reads them as Compose does)."""
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return services
