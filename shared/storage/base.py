"""The object-store interface every backend implements with the same semantics.

Keys are '/'-separated relative paths (no leading '/', no '.' or '..' parts). `put` replaces
an existing object atomically: a reader sees the old bytes or the new, never a mix.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from itertools import islice

from shared.errors import StorageError


def check_key(key: str) -> str:
    """Return `key` if it is a valid object key, else raise `StorageError`."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid object key {key!r}: use a relative path like 'a/b.jpg'")
    return key


class ObjectStore(abc.ABC):
    """Bytes under keys, with an URI per key for messages and logs."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key`, replacing any previous object."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes under `key`; raise `ObjectNotFoundError` if there are none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with `prefix`, in lexicographic order."""

    def list_page(self, prefix: str, start_after: str, limit: int) -> Sequence[str]:
        """Up to `limit` keys starting with `prefix` that sort after `start_after`, in order:
        walks a large prefix in pages without holding its whole listing."""
        return list(islice((k for k in self.list(prefix) if k > start_after), limit))

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """Where `key` lives, for humans: `s3://bucket/key` or `file:///root/key`."""

    def check(self) -> None:
        """Raise `StorageError` unless the store is reachable and usable (default: a listing)."""
        next(iter(self.list("__ping__/")), None)
