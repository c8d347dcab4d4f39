"""The architecture's rules, checked: a pure model core, and services that depend one way.

- The crop model's core (model, loss, matcher, data views, inputs, config, backbone, transformer)
  and the pure helpers (boxes, metrics, descriptors) import nothing from storage, settings,
  queues or servers: they can be read, trained and tested on their own.
- The cropper consumes retrieval (its model reads neighbours); the retriever never imports the
  cropper, the gateway never imports a service's model code.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = [
    "services.cropper.model", "services.cropper.loss", "services.cropper.matcher",
    "services.cropper.data", "services.cropper.inputs", "services.cropper.config",
    "services.cropper.backbone", "services.cropper.transformer", "services.cropper.postprocess",
    "shared.boxes", "shared.metrics", "services.embedder.lite",
]  # fmt: skip
IMPURE = (
    "shared.settings", "shared.storage", "shared.queue", "shared.jobs", "shared.worker",
    "shared.vector_index", "minio", "redis", "celery", "kombu", "pymilvus", "fastapi",
)  # fmt: skip


def _imported_by(module: str) -> list[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", CORE)
def test_core_module_is_pure(module: str) -> None:
    loaded = _imported_by(module)
    impure = [m for m in loaded if m.startswith(IMPURE)]
    assert not impure, f"{module} imports {impure[:5]}"


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement of `path` (at any depth, lazy ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("services/retriever", ("services.cropper", "services.gateway", "procrop")),
        ("services/embedder", ("services.cropper", "services.retriever", "services.gateway")),
        ("services/gateway", ("services.cropper", "services.retriever", "services.embedder")),
        ("shared", ("services", "procrop")),
    ],
)
def test_services_depend_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(forbidden)
    }
    assert not found, sorted(found)
