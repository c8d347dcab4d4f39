"""A query's K neighbours, as the crop model reads them, and the two places they come from: a
Milvus collection (tokens in the object store), or a model bundle's composition index searched in
memory.

Both answer `neighbors(vectors, hashes)` with exact inner-product top-K, a photo never being its
own neighbour. The in-memory search serves the CLI's shipped bundle: with ~1K photos, a numpy
product takes microseconds, while opening Milvus Lite starts a server process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from shared.boxes import flip_xyxy, median_box
from shared.errors import ModelLoadError, ProCropError

if TYPE_CHECKING:
    from services.retriever.search import Retriever
    from services.retriever.token_store import TokenStore


@dataclass(frozen=True)
class Neighbors:
    """The K retrieved photos of one query.

    tokens: (K, 64, T) float32 composition tokens; crops: (K, 4) normalized xyxy crops (zeros where
    a neighbour has none); has_crop: (K,) bool; wide: (W, 4) float64 normalized xyxy crops of a
    wider set of nearest photos (the model config's `transfer_k`; those without a crop left out,
    so W may be 0), or None: the K neighbours' crops serve.
    """

    tokens: np.ndarray
    crops: np.ndarray
    has_crop: np.ndarray
    wide: np.ndarray | None = None

    def flipped(self) -> Neighbors:
        """Mirror image left-right: token grid columns reversed, crops mirrored."""
        k, n, t = self.tokens.shape
        side = round(n**0.5)
        tokens = self.tokens.reshape(k, side, side, t)[:, :, ::-1].reshape(k, n, t)
        crops = np.where(self.has_crop[:, None], flip_xyxy(self.crops), self.crops)
        wide = flip_xyxy(self.wide) if self.wide is not None else None
        return Neighbors(
            np.ascontiguousarray(tokens), crops.astype(self.crops.dtype), self.has_crop, wide
        )

    def samples(self) -> np.ndarray:
        """(S, 4) the retrieved crops, plausible expert crops of the query: the wider set's
        when there is one, else the K neighbours' that have one."""
        return self.wide if self.wide is not None else self.crops[self.has_crop]

    def median_crop(self) -> np.ndarray | None:
        """kNN crop transfer: the per-coordinate median (normalized xyxy) of `samples()`, or
        None when there are none."""
        return median_box(self.samples())


def neighbors_from(
    tokens: np.ndarray, crops: list[list[float] | None], k: int, transfer_k: int = 0
) -> Neighbors:
    """Pad or cut to exactly `k` neighbours (padding: zero tokens, no crop); `crops` may list
    more photos (nearest first) than `k`: with `transfer_k` > 0, the crops of the first
    `transfer_k` of them are the wider set (`Neighbors.wide`)."""
    tokens = np.asarray(tokens, np.float32)[:k]
    boxes = np.zeros((k, 4), np.float32)
    has = np.zeros(k, bool)
    for i, crop in enumerate(crops[:k]):
        if crop is not None:
            boxes[i], has[i] = crop, True
    if len(tokens) < k:
        pad = np.zeros((k - len(tokens), *tokens.shape[1:]), np.float32)
        tokens = np.concatenate([tokens, pad]) if len(tokens) else pad
    wide = None
    if transfer_k:
        wide = np.asarray([c for c in crops[:transfer_k] if c is not None], np.float64)
        wide = wide.reshape(-1, 4)
    return Neighbors(tokens, boxes, has, wide)


class Retrieval(Protocol):
    k: int

    def neighbors(self, vectors: np.ndarray, hashes: Sequence[str | None]) -> list[Neighbors]:
        """Top-K neighbours of each (D,) unit vector; `hashes[i]` is excluded from row i."""
        ...


class BundleRetrieval:
    """Exact search over a bundle's `index.safetensors` (see `services.retriever.bundle_index`)."""

    def __init__(
        self, path: str | Path, k: int, encoder_spec: dict | None = None, transfer_k: int = 0
    ) -> None:
        from services.retriever.bundle_index import read_index

        arrays, meta = read_index(Path(path))
        self.k, self.transfer_k = k, transfer_k
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
            top = np.argsort(-row, kind="stable")[: max(self.k, self.transfer_k)]
            crops = [self.crops[i].tolist() if self.has_crop[i] else None for i in top]
            tokens = self.tokens[top[: self.k]].astype(np.float32)
            out.append(neighbors_from(tokens, crops, self.k, self.transfer_k))
        return out


class MilvusRetrieval:
    """Search a collection of the vector index; tokens from its shards in the object store."""

    def __init__(
        self, retriever: Retriever, tokens: TokenStore, k: int, transfer_k: int = 0
    ) -> None:
        self.retriever, self.tokens, self.k, self.transfer_k = retriever, tokens, k, transfer_k

    def neighbors(self, vectors: np.ndarray, hashes: Sequence[str | None]) -> list[Neighbors]:
        rows = self.retriever.search_vectors(vectors, list(hashes), max(self.k, self.transfer_k))
        out = []
        for row in rows:
            if not row:
                raise ProCropError("the composition index returned no neighbours (is it empty?)")
            grids = self.tokens.read_many([(n.tokens_key, n.token_row) for n in row[: self.k]])
            crops = [n.crops_norm[0] if n.crops_norm else None for n in row]
            out.append(neighbors_from(grids, crops, self.k, self.transfer_k))
        return out
