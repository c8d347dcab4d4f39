"""S3 backend over the `minio` client: MinIO, SeaweedFS, AWS S3 or any S3-compatible server."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from shared.errors import ObjectNotFoundError, StorageError
from shared.storage.base import ObjectStore, check_key

T = TypeVar("T")
_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}


def _http_client(connect_timeout_s: float, retries: int) -> urllib3.PoolManager:
    """Short connect timeouts and few retries: an unreachable server fails in seconds, not minutes."""
    retry = urllib3.Retry(
        total=retries, connect=retries, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)
    )
    timeout = urllib3.Timeout(connect=connect_timeout_s, read=120)
    return urllib3.PoolManager(timeout=timeout, retries=retry, maxsize=16)


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of an S3 server; the bucket is created on first use if missing."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        connect_timeout_s: float = 3.0,
        retries: int = 2,
    ) -> None:
        self.endpoint, self.bucket = endpoint, bucket
        try:
            self.client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=_http_client(connect_timeout_s, retries),
            )
        except ValueError as exc:
            raise StorageError(f"invalid S3 endpoint {endpoint!r}: {exc}") from None
        self._create_bucket = create_bucket
        self._bucket_checked = False

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """Run one S3 request, mapping every failure to a one-line `StorageError`."""
        where = self.uri(key)
        try:
            return fn()
        except S3Error as exc:
            if exc.code in _MISSING:
                raise ObjectNotFoundError(f"no object at {where} ({exc.code})") from None
            if exc.code in _DENIED:
                raise StorageError(
                    f"S3 at {self.endpoint} refused the credentials for {what} {where} ({exc.code})"
                ) from None
            raise StorageError(f"S3 {what} {where} failed: {exc.code}: {exc.message}") from None
        except ValueError as exc:  # minio validates names (bucket, key) client-side
            raise StorageError(f"S3 {what} {where} refused: {exc}") from None
        except (urllib3.exceptions.HTTPError, MinioException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise StorageError(
                f"cannot reach S3 at {self.endpoint} ({what} {where}): {reason}"
            ) from None

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        exists = self._call("bucket check", "", lambda: self.client.bucket_exists(self.bucket))
        if not exists:
            if not self._create_bucket:
                raise ObjectNotFoundError(f"no bucket {self.bucket!r} on S3 at {self.endpoint}")
            self._call("bucket creation", "", self._make_bucket)
        self._bucket_checked = True

    def _make_bucket(self) -> None:
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as exc:  # a concurrent first request made it (8 uploads at once got 503s)
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self._ensure_bucket()
        self._call(
            "upload",
            key,
            lambda: self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )

    def get(self, key: str) -> bytes:
        check_key(key)
        self._ensure_bucket()
        return self._call("download", key, lambda: self._read(key))

    def _read(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        check_key(key)
        self._ensure_bucket()
        try:
            self._call("stat", key, lambda: self.client.stat_object(self.bucket, key))
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        self._ensure_bucket()
        objects = self._call(
            "listing", prefix, lambda: list(self.client.list_objects(self.bucket, prefix, True))
        )
        yield from sorted(obj.object_name for obj in objects if obj.object_name)

    def list_page(self, prefix: str, start_after: str, limit: int) -> Sequence[str]:
        self._ensure_bucket()

        def page() -> list[str]:  # S3 lists in key order; minio pages lazily, 1,000 a request
            objects = self.client.list_objects(
                self.bucket, prefix, recursive=True, start_after=start_after or None
            )
            return [o.object_name for o in islice(objects, limit) if o.object_name]

        return self._call("listing", prefix, page)

    def delete(self, key: str) -> None:
        check_key(key)
        self._ensure_bucket()
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, key))

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"
