"""One exception family for everything a user can get wrong or an outside system can break.

Every error carries a one-line message that says *what* went wrong and *where* (a file, a key,
a URI), so the CLI can print it as-is and the gateway can turn it into a 4xx / 5xx reason.
"""

from __future__ import annotations


def shorten(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters ("..." marks a cut): how echoed input is shown in errors and
    logs, so a 5 MB value never becomes a 5 MB answer or log line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 500 characters), or its type's name when
    it has none."""
    text = str(exc).strip().splitlines()
    return shorten(text[0], 500) if text else type(exc).__name__


class ProCropError(Exception):
    """Base class: an error with a user-facing one-line message."""


class SettingsError(ProCropError):
    """A `PROCROP_*` environment variable (or settings field) is invalid."""


class InvalidImageError(ProCropError):
    """A photo is empty, corrupt, truncated, of an unsupported format, or over the pixel cap."""


class StorageError(ProCropError):
    """The object store is unreachable, refuses our credentials, or fails a request."""


class ObjectNotFoundError(StorageError):
    """A key (or a bucket) does not exist in the object store."""


class VectorIndexError(ProCropError):
    """Milvus is unreachable or refuses a request."""


class CollectionNotFoundError(VectorIndexError):
    """A named collection does not exist in the vector index."""


class IncompatibleCollectionError(VectorIndexError):
    """A collection was built with a different encoder than the one asked to use it."""


class ModelLoadError(ProCropError):
    """Model weights are missing, unreadable, or do not match the model they are loaded into."""
