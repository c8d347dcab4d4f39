"""Object storage: one interface (`ObjectStore`), a local-folder and an S3 backend.

Key layout (one bucket, default `procrop`; see `shared/storage/keys.py`):

    uploads/{sha256}.{ext}                                  photos sent to the gateway
    collections/{collection}/tokens/{shard}.safetensors     composition tokens, fp16, in shards
    collections/{collection}/relations/{name}.json          precomputed query -> top-K relations
    features/{encoder}/{sha256}.safetensors                 per-photo features (BLIP, cached)
    datasets/{run}/...                                      CAD runs: images, pseudo-labels, manifest
    checkpoints/{model}/...                                 model checkpoints (safetensors + JSON)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.errors import StorageError
from shared.storage.base import ObjectStore, check_key
from shared.storage.local import LocalObjectStore

if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.storage.s3 import S3ObjectStore

__all__ = [
    "LocalObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "build_object_store",
    "check_key",
    "parse_s3_uri",
]


def __getattr__(name: str) -> Any:
    """`S3ObjectStore` is imported on first use: the minio client costs start-up time."""
    if name == "S3ObjectStore":
        from shared.storage.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix


def build_object_store(
    settings: Settings, bucket: str | None = None, create_bucket: bool = True
) -> ObjectStore:
    """The configured object store; `bucket` overrides the S3 bucket (e.g. for an ingest source)."""
    cfg = settings.storage
    if cfg.backend == "local":
        root = settings.storage_root if bucket is None else settings.storage_root.parent / bucket
        return LocalObjectStore(root)
    from shared.storage.s3 import S3ObjectStore

    return S3ObjectStore(
        endpoint=cfg.endpoint,
        bucket=bucket or cfg.bucket,
        access_key=cfg.access_key,
        secret_key=cfg.secret_key.get_secret_value(),
        secure=cfg.secure,
        region=cfg.region,
        create_bucket=create_bucket,
    )
