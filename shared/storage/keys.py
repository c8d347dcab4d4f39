"""Object keys, derived from their inputs so that a repeated task writes the same key (idempotence)."""

from __future__ import annotations

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
