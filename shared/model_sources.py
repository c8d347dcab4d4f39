"""Where pretrained weights come from: a hub id or a local folder, and how a run records which.

Every transformers / diffusers loader in the paper profile takes the same kind of name: an existing
folder is read without network; a path-like name that is not a folder fails at once; anything else
is a hub id, read from the local hub cache first and downloaded only when it is not there. The
weights are identified in a model's `version`: a folder by a digest of its weight files, a hub id by
the commit of its cached snapshot.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shared.errors import ModelLoadError, one_line

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What from_pretrained raises for a missing, unreachable or broken model (huggingface_hub's HTTP
# and offline errors are OSErrors; bad configs ValueErrors or KeyErrors; bad tensors RuntimeErrors).
READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError)
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what from_pretrained reads, in its order of preference
_HUB_FILES = ("model_index.json", "config.json")  # one of them is in every model repository
DIGEST_LENGTH = 12


def resolve_source(name_or_path: str | Path, what: str) -> tuple[str, bool]:
    """(what to pass to `from_pretrained`, whether it is a local folder).

    Raises:
        ModelLoadError: the name is a path (absolute, `.` or `~`) but not an existing folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelLoadError(f"{what} path is not a folder: {path}")
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.startswith((".", "~", "/")):
        raise ModelLoadError(f"{what} folder not found: {path}")
    return text, False


def load_local_first(read: Callable[[bool], T], source: str, local: bool, what: str) -> T:
    """`read(local_files_only)`: from the folder or the hub cache first, then from the hub.

    Offline with `HF_HUB_OFFLINE` unset, huggingface_hub retries for minutes before it gives up.

    Raises:
        ModelLoadError: one line naming `source`, from the loader's own error.
    """
    try:
        return read(True)
    except READ_ERRORS as exc:
        if local:
            raise ModelLoadError(f"cannot load {what} from {source}: {one_line(exc)}") from None
        logger.info("%s is not in the local hub cache; downloading it", source)
    try:
        return read(False)
    except READ_ERRORS as exc:
        raise ModelLoadError(f"cannot load {what} from {source}: {one_line(exc)}") from None


def source_version(source: str, local: bool) -> str:
    """`<folder name>:<digest of its weight files>`, or `<hub id>@<snapshot commit>` when cached."""
    if local:
        return f"{Path(source).name}:{weights_digest(Path(source))}"
    from huggingface_hub import try_to_load_from_cache

    for filename in _HUB_FILES:
        cached = try_to_load_from_cache(source, filename)
        if isinstance(cached, str):  # .../snapshots/<commit>/<filename>
            return f"{source}@{Path(cached).parent.name[:DIGEST_LENGTH]}"
    return source


def weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` would read from `folder` and its component subfolders.

    Per folder: the plain `.safetensors` files, else the `.bin` files; precision variants
    (`*.fp16.safetensors`) and top-level single-file checkpoints of a pipeline are not read.
    """
    folders = [folder]
    if (folder / "model_index.json").is_file():  # a diffusers pipeline: one folder per component
        folders = sorted(path for path in folder.iterdir() if path.is_dir())
    found: list[Path] = []
    for part in folders:
        for suffix in WEIGHT_SUFFIXES:
            files = sorted(p for p in part.glob(f"*{suffix}") if p.name.count(".") == 1)
            if files:
                found += files
                break
    return found


def weights_digest(folder: Path) -> str:
    """First 12 hex digits of a SHA-256 over (relative path, SHA-256) of each weight file.

    Reads every byte (about 1-2 s per GB): once per process, when a model loads.
    """
    sha = hashlib.sha256()
    for path in weight_files(folder):
        sha.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return sha.hexdigest()[:DIGEST_LENGTH]


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, hex, read in 1 MB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
