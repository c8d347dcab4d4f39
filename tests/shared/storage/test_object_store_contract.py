"""The `ObjectStore` contract, run unchanged against every backend: a local folder and real S3."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ObjectNotFoundError, StorageError
from shared.settings import Settings, load_settings
from shared.storage import LocalObjectStore, ObjectStore, S3ObjectStore, build_object_store

BAD_KEYS = ["", "/abs", "/", "a/../b", "..", "a//b", "a/", "./a", "a/./b"]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty store of each backend; the S3 one has a fresh bucket on the loopback server."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    s3_settings: Settings = request.getfixturevalue("s3_settings")
    return build_object_store(s3_settings)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\xff binary \n", np.random.default_rng(0).bytes(5 * 1024 * 1024 + 123)],
    ids=["empty", "small", "5MiB"],
)
def test_put_get_round_trip(store: ObjectStore, data: bytes) -> None:
    store.put("photos/a.jpg", data, content_type="image/jpeg")
    assert store.get("photos/a.jpg") == data
    assert store.exists("photos/a.jpg")


def test_put_is_idempotent(store: ObjectStore) -> None:
    store.put("k", b"same")
    store.put("k", b"same")
    assert store.get("k") == b"same"
    assert list(store.list()) == ["k"]


def test_overwrite_replaces(store: ObjectStore) -> None:
    store.put("a/b.bin", b"old bytes, longer than the new ones")
    store.put("a/b.bin", b"new")
    assert store.get("a/b.bin") == b"new"
    assert list(store.list("a/")) == ["a/b.bin"]


def test_missing_key(store: ObjectStore) -> None:
    assert not store.exists("nope/missing.jpg")
    with pytest.raises(ObjectNotFoundError) as info:
        store.get("nope/missing.jpg")
    assert store.uri("nope/missing.jpg") in str(info.value)


def test_prefix_of_a_key_is_not_an_object(store: ObjectStore) -> None:
    store.put("dir/file", b"x")
    assert not store.exists("dir")
    with pytest.raises(ObjectNotFoundError):
        store.get("dir")


def test_list_sorted_and_prefix_filtered(store: ObjectStore) -> None:
    keys = ["b/2", "a/1", "b/10", "ab", "b/1/x", "c", "a/0"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("b/")) == ["b/1/x", "b/10", "b/2"]
    assert list(store.list("a")) == ["a/0", "a/1", "ab"]  # a plain string prefix, as in S3
    assert list(store.list("a/")) == ["a/0", "a/1"]
    assert list(store.list("zzz/")) == []


def test_list_of_empty_store(store: ObjectStore) -> None:
    assert list(store.list()) == []
    store.check()  # an empty store is still usable


def test_delete(store: ObjectStore) -> None:
    store.put("x/1", b"1")
    store.put("x/2", b"2")
    store.delete("x/1")
    assert not store.exists("x/1")
    assert list(store.list("x/")) == ["x/2"]
    with pytest.raises(ObjectNotFoundError):
        store.get("x/1")
    store.delete("x/1")  # deleting again, or a key never written, is fine
    store.delete("never/written")
    assert list(store.list()) == ["x/2"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_refused(store: ObjectStore, key: str) -> None:
    for op in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(StorageError, match="invalid object key"):
            op()
    assert list(store.list()) == []


def test_uri_format(store: ObjectStore) -> None:
    if isinstance(store, S3ObjectStore):
        assert store.uri("a/b.jpg") == f"s3://{store.bucket}/a/b.jpg"
        assert store.uri() == f"s3://{store.bucket}/"
    else:
        assert isinstance(store, LocalObjectStore)
        assert store.uri("a/b.jpg") == f"file://{store.root}/a/b.jpg"
        assert store.uri() == f"file://{store.root}"


def test_readers_see_old_or_new_bytes_never_a_mix(store: ObjectStore) -> None:
    versions = [bytes([v]) * 256 * 1024 for v in (1, 2)]
    store.put("shared/obj", versions[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.put("shared/obj", versions[i % 2])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = {store.get("shared/obj") for _ in range(40)}
    finally:
        stop.set()
        thread.join()
    assert seen <= set(versions)


def test_check_passes_on_a_usable_store(store: ObjectStore) -> None:
    assert store.check() is None  # an empty store (on S3, a bucket not created yet)
    assert list(store.list()) == []  # a check leaves nothing behind
    store.put("k", b"v")
    assert store.check() is None
    assert list(store.list()) == ["k"] and store.get("k") == b"v"


@pytest.mark.parametrize(
    ("variable", "value"), [("SECRET_KEY", "not-the-secret"), ("ACCESS_KEY", "nobody")]
)
def test_check_fails_on_s3_with_wrong_credentials(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The real loopback S3 server refuses the store, and the check says so."""
    monkeypatch.setenv(f"PROCROP_STORAGE__{variable}", value)
    store = build_object_store(load_settings())
    with pytest.raises(StorageError, match="refused the credentials") as info:
        store.check()
    assert type(info.value) is StorageError  # not "not found": the configuration is wrong
    assert s3_settings.storage.endpoint in str(info.value)
    assert "not-the-secret" not in str(info.value)


def test_check_fails_on_a_local_store_whose_root_is_not_a_folder(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    (tmp_path / "objects").rmdir()
    (tmp_path / "objects").write_bytes(b"a file where the store's folder was")
    with pytest.raises(StorageError, match="cannot write"):
        store.put("k", b"v")  # unusable
    with pytest.raises(StorageError):
        store.check()
