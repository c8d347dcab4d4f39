"""What a tenant owns and may read: its uploads, its collections, and the photos it may index.

A tenant is the owner id of an API key (16 hex digits, `services/gateway/deps.owner_of`).

Uploads. Photos are stored content-addressed (`uploads/{sha256}.{ext}`), so two tenants sending
the same photo share its bytes; who sent it is a Redis record per (tenant, photo),
`procrop:upload:{owner}:{sha256}`, written on each upload and kept as long as job records
(`PROCROP_QUEUE__JOB_TTL_S`, renewed by every upload). A JSON crop request may name only an upload
of its own tenant: another tenant's upload gets the same 404 as a missing one, so nobody can test
whether someone else sent a given photo.

Collections. A tenant names its collections freely ("pro"); they live in Milvus and under
`collections/` as `t{owner}_{name}` (`tenant_collection`), so two tenants' "pro" are two
collections and no name a tenant can send reaches another tenant's collection or the crop model's
own index (the bundled one, or `PROCROP_CROP__COLLECTION`): those are written by operators
(`procrop index`, `procrop bundle`) only and read by the crop stage for every tenant. A tenant's
collections are written and read by its own index jobs only. Index jobs record their owner and the
stored name; the index worker re-checks the pair (`check_index_params`) before it writes, so a
task put on the queue by hand cannot write outside its owner's collections either.

Sources. A tenant may index photos under any prefix of the gateway's bucket except the system's
areas (`uploads/`, `jobs/`, `features/`, `datasets/`, `collections/`, `checkpoints/`), which hold
every tenant's data, and another bucket only if `PROCROP_STORAGE__INDEX_BUCKETS` names it. Sources
are made canonical (`s3://bucket/a/b/`: no empty, `.` or `..` parts, no control characters) before
they are checked, and the worker indexes only a canonical `s3://` source.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import redis

from shared.errors import ProCropError, shorten

RESERVED_ROOTS = frozenset(
    {"uploads", "jobs", "features", "datasets", "collections", "checkpoints"}
)
MAX_SOURCE_CHARS = 1024  # an index source or an annotations key
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,199}$"  # a tenant's collection name (Milvus rules, short)
UPLOAD_KEY_PATTERN = r"^uploads/[0-9a-f]{64}\.(jpg|png|webp)$"  # what the gateway stores
UPLOAD_PREFIX = "procrop:upload:"
_OWNER = re.compile(r"[0-9a-f]{16}")
_NAME = re.compile(NAME_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")  # control characters, and '\' (a path on some servers)


class OwnershipError(ProCropError, ValueError):
    """A tenant asked for something it does not own or may not read (bad input: a job that asks
    for it fails at once, never retried)."""


def tenant_collection(owner: str, name: str) -> str:
    """The stored name of tenant `owner`'s collection `name` (checked: NAME_PATTERN)."""
    if not _OWNER.fullmatch(owner):
        raise OwnershipError(f"invalid owner id {shorten(owner)!r}")
    if not _NAME.fullmatch(name):
        raise OwnershipError(
            f"invalid collection name {shorten(name)!r}: start with a letter, then up to 199 "
            "letters, digits or '_'"
        )
    return f"t{owner}_{name}"


def index_source(source: str, bucket: str, other_buckets: Collection[str] = ()) -> str:
    """The canonical `s3://bucket/prefix/` for `source` ("prefix/" in `bucket`, the gateway's, or
    "s3://bucket/prefix"); OwnershipError unless a tenant may index it (see the module)."""
    text = source.strip()
    if len(text) > MAX_SOURCE_CHARS or _CONTROL.search(text):
        raise OwnershipError(
            f"source: at most {MAX_SOURCE_CHARS} printable characters, got {shorten(source)!r}"
        )
    if text.startswith("s3://"):
        bucket_name, _, prefix = text.removeprefix("s3://").partition("/")
    else:
        bucket_name, prefix = bucket, text
    if bucket_name != bucket and bucket_name not in other_buckets:
        raise OwnershipError(
            f"source: bucket {shorten(bucket_name)!r} is not readable by index jobs "
            "(PROCROP_STORAGE__INDEX_BUCKETS)"
        )
    parts = [p for p in prefix.split("/") if p]
    if not parts:
        raise OwnershipError("source: give a prefix of photos, e.g. 'pro/photos/'")
    if any(p in (".", "..") for p in parts) or (
        bucket_name == bucket and parts[0] in RESERVED_ROOTS
    ):
        raise OwnershipError(f"source: {shorten(source)!r} is not a prefix of photos to index")
    return f"s3://{bucket_name}/{'/'.join(parts)}/"


def check_annotations_key(key: str) -> str:
    """`key` if an index job may read crop annotations from it (not in a system area)."""
    parts = key.split("/")
    if (
        len(key) > MAX_SOURCE_CHARS
        or _CONTROL.search(key)
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or parts[0] in RESERVED_ROOTS
    ):
        raise OwnershipError(f"annotations_key: {shorten(key)!r} is not a readable object key")
    return key


def check_index_params(
    owner: str, params: dict[str, Any], bucket: str, other_buckets: Collection[str] = ()
) -> None:
    """An index job's recorded parameters are what its owner may ask for: its own collection, a
    canonical source it may read, readable annotations. OwnershipError otherwise (the worker's
    re-check of what the gateway checked)."""
    collection = str(params.get("collection", ""))
    prefix = f"t{owner}_"
    if not (_OWNER.fullmatch(owner) and collection.startswith(prefix)):
        raise OwnershipError(f"collection {shorten(collection)!r} is not owned by this job's owner")
    tenant_collection(owner, collection.removeprefix(prefix))
    source = str(params.get("source", ""))
    if not source.startswith("s3://") or index_source(source, bucket, other_buckets) != source:
        raise OwnershipError(f"source: {shorten(source)!r} is not a canonical source it may read")
    if params.get("annotations_key"):
        check_annotations_key(str(params["annotations_key"]))


class UploadOwners:
    """Which tenant uploaded which photo: one Redis key per (owner, sha256), with a TTL."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis, self.ttl_s = client, ttl_s

    def record(self, owner: str, sha256: str) -> None:
        self.redis.set(f"{UPLOAD_PREFIX}{owner}:{sha256}", 1, ex=self.ttl_s)

    def owns(self, owner: str, sha256: str) -> bool:
        return bool(self.redis.exists(f"{UPLOAD_PREFIX}{owner}:{sha256}"))
