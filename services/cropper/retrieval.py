"""Where a photo's K neighbours come from, for the crop model: a Milvus collection (with tokens in
the object store), or the composition index inside a model bundle, searched in memory.

Both answer `neighbors(vectors, hashes)` with exact inner-product top-K, a photo never being its
own neighbour. The in-memory search serves the CLI's shipped bundle: with ~1K photos, a numpy
product takes microseconds, while opening Milvus Lite starts a server process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from services.cropper.inputs import Neighbors, neighbors_from
from shared.errors import ModelLoadError, ProCropError


class Retrieval(Protocol):
    k: int

    def neighbors(self, vectors: np.ndarray, hashes: Sequence[str | None]) -> list[Neighbors]:
        """Top-K neighbours of each (D,) unit vector; `hashes[i]` is excluded from row i."""
        ...


class BundleRetrieval:
    """Exact search over a bundle's `index.safetensors` (see `services.cropper.bundle`)."""

    def __init__(self, path: str | Path, k: int, encoder_spec: dict | None = None) -> None:
        from services.cropper.bundle import read_index

        arrays, meta = read_index(Path(path))
        self.k = k
        self.vectors = arrays["vectors"]  # (n, D) unit rows
        self.tokens = arrays["tokens"]  # (n, 64, T) float16
        self.crops, self.has_crop = arrays["crops"], arrays["has_crop"]
        self.hashes = np.asarray([h for h, _ in json.loads(meta["photos"])])
        self.encoder = json.loads(meta["encoder"])
        if encoder_spec is not None:
            keys = ("encoder", "encoder_version", "vector_dim", "token_dim")
            if any(self.encoder.get(key) != encoder_spec.get(key) for key in keys):
                raise ModelLoadError(f"{path}: index built by another encoder ({self.encoder})")

    def neighbors(self, vectors: np.ndarray, hashes: Sequence[str | None]) -> list[Neighbors]:
        scores = vectors.astype(np.float32) @ self.vectors.T  # (Q, n)
        out = []
        for row, sha in zip(scores, hashes, strict=True):
            if sha is not None:
                row = np.where(self.hashes == sha, -np.inf, row)
            top = np.argsort(-row, kind="stable")[: self.k]
            crops = [self.crops[i].tolist() if self.has_crop[i] else None for i in top]
            out.append(neighbors_from(self.tokens[top].astype(np.float32), crops, self.k))
        return out


class MilvusRetrieval:
    """Search a collection of the vector index; tokens from its shards in the object store."""

    def __init__(self, retriever: object, tokens: object, k: int) -> None:
        self.retriever, self.tokens, self.k = retriever, tokens, k

    def neighbors(self, vectors: np.ndarray, hashes: Sequence[str | None]) -> list[Neighbors]:
        rows = self.retriever.search_vectors(vectors, list(hashes), self.k)  # type: ignore[attr-defined]
        out = []
        for row in rows:
            if not row:
                raise ProCropError("the composition index returned no neighbours (is it empty?)")
            grids = self.tokens.read_many([(n.tokens_key, n.token_row) for n in row])  # type: ignore[attr-defined]
            crops = [n.crops_norm[0] if n.crops_norm else None for n in row]
            out.append(neighbors_from(grids, crops, self.k))
        return out
