"""Composition search: photos -> their top-K compositional neighbours in a collection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.embedder.base import CompositionEncoder
from shared.boxes import median_box
from shared.vector_index import Neighbor, VectorIndex


@dataclass(frozen=True)
class Query:
    """A decoded photo to search with; `sha256` lets a photo of the collection skip itself."""

    name: str
    sha256: str
    image: Image.Image


class Retriever:
    """Searches one collection with the encoder that built it."""

    def __init__(
        self,
        collection: str,
        encoder: CompositionEncoder | None,
        index: VectorIndex,
        spec: dict[str, str | int] | None = None,
    ) -> None:
        """`spec` (an encoder's `spec`) stands in for `encoder` where vectors arrive precomputed
        (the retrieve worker): `search_vectors` then works, `search` does not."""
        if encoder is not None:
            spec = encoder.spec
        elif spec is None:
            raise ValueError("give the encoder, or the spec of the encoder the vectors came from")
        self.collection, self.encoder, self.index = collection, encoder, index
        self.spec: dict[str, str | int] = spec
        self.metadata = index.check_compatible(collection, self.spec)

    def search(self, queries: Sequence[Query], k: int = 10) -> list[list[Neighbor]]:
        """Top-`k` neighbours per query, best first; a query never gets itself (same sha256)."""
        if not queries:
            return []
        vectors = self.encode([q.image for q in queries])
        return self.search_vectors(vectors, [q.sha256 for q in queries], k)

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) index vectors of the photos."""
        if self.encoder is None:
            raise ValueError("this retriever has no encoder: search with precomputed vectors")
        return self.encoder.encode(images).vectors

    def search_vectors(
        self, vectors: np.ndarray, hashes: Sequence[str | None], k: int
    ) -> list[list[Neighbor]]:
        """Like `search` for (Q, D) precomputed vectors; `hashes[i]` is excluded from row i."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        # One extra hit covers the query itself: a photo is stored at most once (id = its hash).
        rows = self.index.search(self.collection, vectors, k + 1)
        return [
            [n for n in row if n.content_hash != sha][:k]
            for row, sha in zip(rows, hashes, strict=True)
        ]


def median_crop(neighbors: Sequence[Neighbor]) -> np.ndarray | None:
    """kNN crop transfer: the per-coordinate median of the neighbours' first annotated crops.

    Returns:
        (4,) normalized xyxy, or None when no neighbour has an annotation.
    """
    return median_box(np.asarray([n.crops_norm[0] for n in neighbors if n.crops_norm]))
