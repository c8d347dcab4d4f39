"""`build_object_store` picks the configured backend; `parse_s3_uri` splits s3:// URIs."""

from __future__ import annotations

import pytest

from shared.errors import StorageError
from shared.settings import Settings
from shared.storage import LocalObjectStore, S3ObjectStore, build_object_store, parse_s3_uri


def test_local_backend_under_home(settings: Settings) -> None:
    store = build_object_store(settings)
    assert isinstance(store, LocalObjectStore)
    assert store.root == settings.storage_root.resolve()
    assert store.root.is_dir()
    store.put("k", b"v")
    assert build_object_store(settings).get("k") == b"v"


def test_local_bucket_override_is_a_sibling_folder(settings: Settings) -> None:
    store = build_object_store(settings, bucket="ingest")
    assert isinstance(store, LocalObjectStore)
    assert store.root == (settings.storage_root.parent / "ingest").resolve()
    store.put("k", b"v")
    assert not build_object_store(settings).exists("k")


def test_s3_backend_from_settings(s3_settings: Settings) -> None:
    store = build_object_store(s3_settings)
    assert isinstance(store, S3ObjectStore)
    assert store.bucket == s3_settings.storage.bucket
    assert store.endpoint == s3_settings.storage.endpoint
    store.put("k", b"v")
    assert build_object_store(s3_settings).get("k") == b"v"


def test_s3_bucket_override(s3_settings: Settings) -> None:
    store = build_object_store(s3_settings, bucket="ingest-source")
    assert isinstance(store, S3ObjectStore)
    assert store.bucket == "ingest-source"
    assert store.uri("x") == "s3://ingest-source/x"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/some/prefix", ("bucket", "some/prefix")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket", ("bucket", "")),
        ("s3://b/a/b/c.jpg", ("b", "a/b/c.jpg")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


def test_parse_s3_uri_round_trips_store_uri(s3_settings: Settings) -> None:
    store = build_object_store(s3_settings)
    assert parse_s3_uri(store.uri("a/b.jpg")) == (s3_settings.storage.bucket, "a/b.jpg")


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("bucket/prefix", "not an s3:// URI"),
        ("http://bucket/prefix", "not an s3:// URI"),
        ("S3:/bucket", "not an s3:// URI"),
        ("", "not an s3:// URI"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
    ],
)
def test_parse_s3_uri_errors(uri: str, reason: str) -> None:
    with pytest.raises(StorageError, match=reason) as info:
        parse_s3_uri(uri)
    assert repr(uri) in str(info.value)
