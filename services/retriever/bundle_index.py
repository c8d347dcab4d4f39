"""The composition index inside a model bundle (a crop-model checkpoint plus the index of its
training photos). The `lite` bundle ships in the package (`procrop/models/lite/`, found by
`shared.checkpoints.shipped_bundle`), so `procrop crop` works on a fresh machine with no network.
Files:

    model.safetensors, config.json     the checkpoint (see `services.cropper.checkpoint`)
    model.onnx                         the same weights for ONNX Runtime (`services.cropper.runtime`)
    index.safetensors                  vectors (n, 256) f32, tokens (n, 64, T) f16, crops (n, 4) f32
                                       normalized xyxy, sizes (n, 2) i32; metadata: collection name,
                                       encoder spec, photo hashes and names (JSON)

`install_bundle` loads the index into the configured vector index and object store once (keyed by
the bundle's digest), after which retrieval runs through Milvus like any other collection.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save_file

from shared.checkpoints import INDEX_FILE
from shared.errors import ModelLoadError
from shared.vector_index import IndexedPhoto

if TYPE_CHECKING:  # the crop path reads bundles without the storage clients (start-up time)
    from services.retriever.token_store import TokenStore
    from shared.storage import ObjectStore
    from shared.vector_index import VectorIndex

log = logging.getLogger(__name__)
__all__ = ["INDEX_FILE", "export_index", "install_bundle", "read_index"]
SHARD_ROWS = 512


def export_index(
    index: VectorIndex,
    tokens: TokenStore,
    collection: str,
    hashes: dict[str, str],
    out_dir: str | Path,
) -> int:
    """Write the rows of `hashes` ({sha256: photo name}) found in `collection` to the bundle."""
    fields = ["content_hash", "vector", "tokens_key", "token_row", "width", "height", "crops_norm"]
    rows = sorted(index.rows(collection, hashes, fields), key=lambda r: r["content_hash"])
    if not rows:
        raise ModelLoadError(f"collection {collection!r} holds none of the {len(hashes)} photos")
    crops = [(r["crops_norm"] or [[0.0, 0.0, 0.0, 0.0]])[0] for r in rows]
    arrays: dict[str, np.ndarray] = {
        "vectors": np.asarray([r["vector"] for r in rows], np.float32),
        "tokens": tokens.read_many([(r["tokens_key"], r["token_row"]) for r in rows]).astype(
            np.float16
        ),
        "crops": np.asarray(crops, np.float32),
        "has_crop": np.asarray([bool(r["crops_norm"]) for r in rows]),
        "sizes": np.asarray([[r["width"], r["height"]] for r in rows], np.int32),
    }
    meta = {
        "collection": collection,
        "encoder": json.dumps(index.metadata(collection)),
        "photos": json.dumps([[r["content_hash"], hashes[r["content_hash"]]] for r in rows]),
    }
    save_file(arrays, str(Path(out_dir) / INDEX_FILE), metadata=meta)
    return len(rows)


def _collection_name(path: Path, meta: dict[str, str]) -> str:
    """The collection a bundle installs into: its own name plus a digest of its index file."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    return f"bundle_{meta['collection']}_{digest}"


def install_bundle(bundle_dir: str | Path, index: VectorIndex, store: ObjectStore) -> str:
    """Make the bundle's index searchable (once); returns its collection name."""
    from services.retriever.token_store import TokenStore

    path = Path(bundle_dir) / INDEX_FILE
    if not path.is_file():
        raise ModelLoadError(f"no composition index in the model bundle {bundle_dir}")
    arrays, meta = read_index(path)
    name = _collection_name(path, meta)
    photos = json.loads(meta["photos"])
    if index.has_collection(name) and index.count(name) == len(photos):
        return name
    spec = json.loads(meta["encoder"])
    index.ensure_collection(
        name, {k: spec[k] for k in ("encoder", "encoder_version", "token_dim", "vector_dim")}
    )
    tokens = TokenStore(store, name)
    for start in range(0, len(photos), SHARD_ROWS):
        chunk = photos[start : start + SHARD_ROWS]
        key = tokens.write_shard(
            [h for h, _ in chunk], arrays["tokens"][start : start + len(chunk)]
        )
        index.upsert(
            name, [_row(arrays, start + i, sha, src, key, i) for i, (sha, src) in enumerate(chunk)]
        )
    index.flush(name)
    log.info("installed the bundled index %s (%d photos)", name, len(photos))
    return name


def _row(
    arrays: dict[str, np.ndarray], i: int, sha: str, name: str, key: str, row: int
) -> IndexedPhoto:
    width, height = (int(v) for v in arrays["sizes"][i])
    crops = [arrays["crops"][i].tolist()] if arrays["has_crop"][i] else []
    return IndexedPhoto(sha, arrays["vectors"][i], f"bundle:{name}", key, row, width, height, crops)


def read_index(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A bundle's index arrays and metadata; raises `ModelLoadError` if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:  # safetensors raises its own error types on bad files
        raise ModelLoadError(f"{path}: unreadable composition index ({exc})") from None
