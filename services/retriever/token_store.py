"""Composition tokens in the object store: fp16 shards of many photos, never one object per photo.

A shard is a safetensors file with `tokens` (n, 64, d) fp16 and `hashes` (n, 32) uint8 (the sha256
of each photo); its key is derived from the hashes it holds, so rewriting the same batch is harmless.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.errors import StorageError
from shared.storage.base import ObjectStore
from shared.storage.keys import token_shard_key


class TokenStore:
    """Write and read token shards of one collection."""

    def __init__(self, store: ObjectStore, collection: str, cache_shards: int = 64) -> None:
        self.store, self.collection = store, collection
        self._load = functools.lru_cache(maxsize=cache_shards)(self._load_uncached)

    def write_shard(self, hashes: list[str], tokens: np.ndarray) -> str:
        """Store (n, 64, d) tokens of the photos with sha256 `hashes`; returns the shard's key."""
        if len(hashes) != len(tokens):
            raise ValueError(f"{len(hashes)} hashes for {len(tokens)} token grids")
        shard = hashlib.sha256("".join(hashes).encode()).hexdigest()[:32]
        key = token_shard_key(self.collection, shard)
        digests = np.frombuffer(bytes.fromhex("".join(hashes)), np.uint8).reshape(-1, 32)
        payload = st_save(
            {"tokens": np.ascontiguousarray(tokens, np.float16), "hashes": digests.copy()},
            metadata={"collection": self.collection, "format": "procrop-tokens-v1"},
        )
        self.store.put(key, payload)
        return key

    def _load_uncached(self, key: str) -> dict[str, np.ndarray]:
        try:
            return st_load(self.store.get(key))
        except StorageError:
            raise
        except Exception as exc:  # safetensors raises its own error types on bad bytes
            raise StorageError(f"{self.store.uri(key)}: unreadable token shard ({exc})") from None

    def read(self, key: str, row: int) -> np.ndarray:
        """(64, d) float32 tokens of one photo."""
        return self._load(key)["tokens"][row].astype(np.float32)

    def read_many(self, refs: list[tuple[str, int]]) -> np.ndarray:
        """(n, 64, d) float32 tokens for (shard key, row) pairs, in order."""
        return np.stack([self.read(key, row) for key, row in refs])
