"""Query -> top-K relations for a whole training set, precomputed once into one JSON file.

The crop model's trainer reads this file instead of searching Milvus in its data loader, as the
paper does. Layout:

    {"collection": NAME, "k": K, "encoder": {...encoder spec...},
     "photos": {PHOTO_NAME: {"content_hash": SHA256,
                             "neighbors": [{"content_hash", "tokens_key", "token_row", "score",
                                            "crop_norm": [x1, y1, x2, y2] or null}, ...]}}}

PHOTO_NAME is the photo's path relative to the source folder (as in annotation files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.retriever.search import Retriever
from services.retriever.sources import PhotoRef
from shared.images import content_hash, decode_image
from shared.vector_index import Neighbor


def compute_relations(
    retriever: Retriever,
    photos: list[PhotoRef],
    k: int = 10,
    max_pixels: int = 50_000_000,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Top-`k` neighbours of every photo (never itself); stored vectors are reused, others encoded."""
    out: dict[str, Any] = {
        "collection": retriever.collection,
        "k": k,
        "encoder": retriever.spec,
        "photos": {},
    }
    for start in range(0, len(photos), batch_size):
        batch = photos[start : start + batch_size]
        data = [ref.read() for ref in batch]
        hashes = [content_hash(d) for d in data]
        vectors = _vectors(retriever, batch, data, hashes, max_pixels)
        for ref, sha, row in zip(
            batch, hashes, retriever.search_vectors(vectors, hashes, k), strict=True
        ):
            out["photos"][ref.name] = {"content_hash": sha, "neighbors": [_entry(n) for n in row]}
        if on_progress:
            on_progress(len(batch))
    return out


def _vectors(
    retriever: Retriever,
    refs: list[PhotoRef],
    data: list[bytes],
    hashes: list[str],
    max_pixels: int,
) -> np.ndarray:
    stored = retriever.index.vectors(retriever.collection, hashes)
    missing = [i for i, sha in enumerate(hashes) if sha not in stored]
    images = [decode_image(data[i], refs[i].uri, max_pixels) for i in missing]
    encoded = retriever.encode(images)
    fresh = {hashes[i]: encoded[j] for j, i in enumerate(missing)}
    return np.stack([stored[sha] if sha in stored else fresh[sha] for sha in hashes])


def _entry(n: Neighbor) -> dict[str, Any]:
    return {
        "content_hash": n.content_hash,
        "tokens_key": n.tokens_key,
        "token_row": n.token_row,
        "score": round(n.score, 6),
        "crop_norm": n.crops_norm[0] if n.crops_norm else None,
    }


def write_relations(relations: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(relations, separators=(",", ":")))


def read_relations(path: str | Path) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))
