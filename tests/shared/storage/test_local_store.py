"""Local-folder backend: atomic writes through hidden temp files, which listings never show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.errors import StorageError
from shared.storage import LocalObjectStore


def _files(root: Path) -> list[str]:
    """Every file under `root`, hidden ones included, as sorted relative paths."""
    return sorted(
        (Path(d) / name).relative_to(root).as_posix()
        for d, _, names in os.walk(root)
        for name in names
    )


def test_objects_are_plain_files_and_no_temp_files_remain(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    for i in range(3):
        store.put("a/b/c.bin", bytes([i]) * 1000)
    store.put("top", b"t")
    assert _files(store.root) == ["a/b/c.bin", "top"]
    assert (store.root / "a/b/c.bin").read_bytes() == bytes([2]) * 1000


def test_hidden_temp_files_are_not_listed(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put("a/x.jpg", b"x")
    (store.root / "a" / ".procrop-tmp-abc123").write_bytes(b"half a wri")  # a crashed writer
    (store.root / ".procrop-tmp-y").write_bytes(b"")
    assert list(store.list()) == ["a/x.jpg"]
    assert store.get("a/x.jpg") == b"x"


def test_root_is_created_and_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = LocalObjectStore("~/deep/store")
    assert store.root == tmp_path / "deep" / "store"
    assert store.root.is_dir()


def test_same_root_shares_objects(tmp_path: Path) -> None:
    LocalObjectStore(tmp_path / "objects").put("k", b"v")
    assert LocalObjectStore(tmp_path / "objects").get("k") == b"v"


def test_uncreatable_root_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create object store folder"):
        LocalObjectStore(blocker / "objects")


def test_key_under_an_existing_object_is_a_storage_error(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put("a", b"file")
    with pytest.raises(StorageError, match="cannot write"):
        store.put("a/b", b"child")
    assert store.get("a") == b"file"


def test_failed_put_leaves_no_temp_file(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put("d/x", b"x")
    with pytest.raises(StorageError):
        store.put("d", b"replaces a folder")  # os.replace onto a directory fails
    assert _files(store.root) == ["d/x"]


def test_dot_file_keys_are_listed(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put("a/.env", b"x")
    assert store.get("a/.env") == b"x"
    assert list(store.list()) == ["a/.env"]
