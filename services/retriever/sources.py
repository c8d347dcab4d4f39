"""Where photos to index come from: a local folder, or an `s3://bucket/prefix` of an S3 server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from shared.errors import ProCropError
from shared.images import is_image_name, read_bytes
from shared.settings import Settings
from shared.storage import ObjectStore, build_object_store, parse_s3_uri


@dataclass(frozen=True)
class PhotoRef:
    """A photo to read: `name` is its path relative to the source (matches annotation files)."""

    name: str
    uri: str
    read: Callable[[], bytes]


def list_photos(source: str, settings: Settings) -> list[PhotoRef]:
    """Every JPEG / PNG / WebP under `source` (a folder or `s3://bucket/prefix`), sorted by name."""
    if source.startswith("s3://"):
        return _s3_photos(source, settings)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ProCropError(f"{source}: no such folder (expected a folder or s3://bucket/prefix)")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name))
    return [PhotoRef(p.relative_to(root).as_posix(), str(p), partial(read_bytes, p)) for p in paths]


def photo_refs(source: str, names: list[str], settings: Settings) -> list[PhotoRef]:
    """The photos `names` (as `list_photos` named them) of `source`, without listing it again."""
    if source.startswith("s3://"):
        store, base = _s3_source(source, settings)
        return [PhotoRef(n, store.uri(base + n), partial(store.get, base + n)) for n in names]
    root = Path(source).expanduser()
    return [PhotoRef(n, str(root / n), partial(read_bytes, root / n)) for n in names]


def _s3_source(source: str, settings: Settings) -> tuple[ObjectStore, str]:
    """The store of an `s3://bucket/prefix` source and its key prefix ('' or ending in '/')."""
    bucket, prefix = parse_s3_uri(source)
    if settings.storage.backend != "s3":
        raise ProCropError(
            f"{source}: set PROCROP_STORAGE__BACKEND=s3 (and its endpoint) to read S3"
        )
    store = build_object_store(settings, bucket=bucket, create_bucket=False)
    return store, prefix.rstrip("/") + "/" if prefix else ""


def _s3_photos(source: str, settings: Settings) -> list[PhotoRef]:
    store, base = _s3_source(source, settings)
    return [
        PhotoRef(key[len(base) :], store.uri(key), partial(store.get, key))
        for key in store.list(base)
        if is_image_name(key)
    ]


def photo_page(
    source: str, settings: Settings, start_after: str, limit: int
) -> tuple[list[PhotoRef], bool]:
    """Up to `limit` photos of `source` named after `start_after`, in name order, and whether the
    source ends there. Pages through S3 with `start_after`, so a planner never lists it whole."""
    if not source.startswith("s3://"):
        refs = [ref for ref in list_photos(source, settings) if ref.name > start_after]
        return refs[:limit], len(refs) <= limit
    store, base = _s3_source(source, settings)
    found: list[PhotoRef] = []
    after = base + start_after if start_after else ""
    while len(found) < limit:
        keys = store.list_page(base, after, limit)
        found += [
            PhotoRef(k[len(base) :], store.uri(k), partial(store.get, k))
            for k in keys
            if is_image_name(k)
        ]
        if len(keys) < limit:
            return found[:limit], len(found) <= limit
        after = keys[-1]
    return found[:limit], False
