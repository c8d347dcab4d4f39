"""Object keys, derived from their inputs so that a repeated task writes the same key (idempotence)."""

from __future__ import annotations

import hashlib
import re

from shared.errors import ProCropError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,254}$")


def check_collection_name(name: str) -> str:
    """Collection names follow Milvus rules (letter first, then letters, digits, '_')."""
    if not _NAME.fullmatch(name):
        raise ProCropError(
            f"invalid collection name {name!r}: start with a letter, then letters, digits or '_'"
        )
    return name


def upload_key(sha256: str, ext: str) -> str:
    return f"uploads/{sha256}.{ext.lstrip('.').lower()}"


def token_shard_key(collection: str, shard: str) -> str:
    return f"collections/{collection}/tokens/{shard}.safetensors"


def relations_key(collection: str, name: str) -> str:
    return f"collections/{collection}/relations/{name}.json"


def features_key(encoder: str, version: str, sha256: str) -> str:
    """Per-photo features of one encoder version (cached: the same photo is embedded once)."""
    tag = hashlib.sha256(version.encode()).hexdigest()[:12]
    return f"features/{encoder}-{tag}/{sha256}.safetensors"


def job_key(job_id: str, name: str) -> str:
    """An output of job `job_id` (`neighbors.safetensors`, `result.json`, `plan.json`...)."""
    return f"jobs/{job_id}/{name}"
