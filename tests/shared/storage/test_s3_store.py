"""S3 backend against the real loopback SeaweedFS server: buckets, credentials, outages."""

from __future__ import annotations

import time
import uuid

import pytest
from minio import Minio

from procrop.servers import ServerProcess, free_port
from shared.errors import ObjectNotFoundError, StorageError
from shared.settings import Settings
from shared.storage import S3ObjectStore, build_object_store

ACCESS_KEY = "procrop-test"  # as in tests/conftest.py
SECRET_KEY = "procrop-test-secret"


def _bucket() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _client(server: ServerProcess) -> Minio:
    return Minio(f"127.0.0.1:{server.port}", ACCESS_KEY, SECRET_KEY, secure=False)


def test_bucket_created_on_first_use(s3_server: ServerProcess) -> None:
    bucket = _bucket()
    client = _client(s3_server)
    store = S3ObjectStore(f"127.0.0.1:{s3_server.port}", bucket, ACCESS_KEY, SECRET_KEY)
    assert not client.bucket_exists(bucket)  # constructing the store sends no request
    store.put("a", b"1")
    assert client.bucket_exists(bucket)
    assert client.get_object(bucket, "a").read() == b"1"


def test_existing_bucket_is_reused(s3_server: ServerProcess) -> None:
    bucket = _bucket()
    endpoint = f"127.0.0.1:{s3_server.port}"
    S3ObjectStore(endpoint, bucket, ACCESS_KEY, SECRET_KEY).put("kept", b"1")
    again = S3ObjectStore(endpoint, bucket, ACCESS_KEY, SECRET_KEY)
    assert again.get("kept") == b"1"
    assert list(again.list()) == ["kept"]


def test_missing_bucket_not_created_when_asked(s3_server: ServerProcess) -> None:
    bucket = _bucket()
    store = S3ObjectStore(
        f"127.0.0.1:{s3_server.port}", bucket, ACCESS_KEY, SECRET_KEY, create_bucket=False
    )
    with pytest.raises(ObjectNotFoundError, match=bucket):
        store.get("a")
    assert not _client(s3_server).bucket_exists(bucket)


def test_buckets_are_isolated(s3_settings: Settings) -> None:
    store = build_object_store(s3_settings)
    other = build_object_store(s3_settings, bucket=_bucket())
    store.put("k", b"mine")
    assert not other.exists("k")
    assert list(other.list()) == []


def test_content_type_is_stored(s3_server: ServerProcess, s3_settings: Settings) -> None:
    store = build_object_store(s3_settings)
    store.put("p.jpg", b"\xff\xd8", content_type="image/jpeg")
    assert isinstance(store, S3ObjectStore)
    stat = _client(s3_server).stat_object(store.bucket, "p.jpg")
    assert stat.content_type == "image/jpeg"


@pytest.mark.parametrize(("access", "secret"), [(ACCESS_KEY, "wrong"), ("nobody", SECRET_KEY)])
def test_wrong_credentials(s3_server: ServerProcess, access: str, secret: str) -> None:
    endpoint = f"127.0.0.1:{s3_server.port}"
    store = S3ObjectStore(endpoint, _bucket(), access, secret)
    for op in (lambda: store.put("a", b"1"), lambda: store.get("a"), lambda: list(store.list())):
        with pytest.raises(StorageError) as info:
            op()
        assert type(info.value) is StorageError  # not "not found": the caller must fix the config
        assert "credentials" in str(info.value)
        assert endpoint in str(info.value)
        assert "wrong" not in str(info.value)  # the secret is not echoed


def test_unreachable_server_fails_fast_naming_the_endpoint() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = S3ObjectStore(endpoint, "procrop", ACCESS_KEY, SECRET_KEY)
    for op in (lambda: store.put("a", b"1"), store.check):
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            op()
        assert time.monotonic() - start < 10  # a clear error, not a hang in retries
        assert "cannot reach S3" in str(info.value)
        assert endpoint in str(info.value)
        assert info.value.__cause__ is None


def test_invalid_bucket_name_is_a_storage_error(s3_server: ServerProcess) -> None:
    store = S3ObjectStore(f"127.0.0.1:{s3_server.port}", "ab", ACCESS_KEY, SECRET_KEY)
    with pytest.raises(StorageError, match="ab"):
        store.put("a", b"1")


def test_invalid_endpoint_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="notaport"):
        S3ObjectStore("127.0.0.1:notaport", "procrop", ACCESS_KEY, SECRET_KEY)
