"""A folder with object-store semantics: the embedded default, and what tests of the core use."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared.errors import ObjectNotFoundError, StorageError
from shared.storage.base import ObjectStore, check_key

_TMP_PREFIX = ".procrop-tmp-"  # in-flight writes; never listed


class LocalObjectStore(ObjectStore):
    """Objects as files under `root`; the key is the relative path."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        """`create`: make the folder now (else reads of a missing folder find no objects, and
        the first write makes it)."""
        self.root = Path(root).expanduser().resolve()
        if not create:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create object store folder {self.root}: {exc}") from None

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def check(self) -> None:
        """The root must be a folder this process can write into (a listing cannot tell)."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"object store folder {self.root} is not a writable folder")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target, then rename: readers never see a partial object.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
        except OSError as exc:
            raise StorageError(f"cannot write {self.uri(key)}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {self.uri(key)}: {exc}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(f"no object at {self.uri(key)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri(key)}: {exc}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not name.startswith(_TMP_PREFIX):
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {self.uri(key)}: {exc}") from None

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()
