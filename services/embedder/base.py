"""The composition-encoder interface: photo -> composition tokens on an 8 x 8 grid + one index vector.

Tokens R_i (64 x d, the paper's composition tokens; d = 256 for SAM) feed the crop model's
retrieval fusion; the vector (`VECTOR_DIM` floats, L2-normalized) drives the top-K search.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shared.model_sources import file_sha256 as file_sha256  # re-exported (SAM, effnet versions)

GRID = 8  # tokens per side: 8 x 8 = 64 tokens per photo
NUM_TOKENS = GRID * GRID
VECTOR_DIM = 256
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


@dataclass(frozen=True)
class Embedding:
    """Composition features of a batch of B photos.

    tokens:  (B, 64, d) float32; token t describes grid cell (row t // 8, column t % 8).
    vectors: (B, VECTOR_DIM) float32, unit L2 norm; inner product = cosine similarity.
    features: (B, 64, C) float32, the wider cells the tokens were projected from (pretrained
        encoder: the crop model reads them as its backbone output), or None.
    """

    tokens: np.ndarray
    vectors: np.ndarray
    features: np.ndarray | None = None  # (B, 64, C) the encoder's own feature cells, if it has any

    def __len__(self) -> int:
        return len(self.vectors)


class CompositionEncoder(abc.ABC):
    """Encodes photos into composition tokens and index vectors.

    Attributes `name` and `version` identify the encoder in a collection's metadata, so a
    collection is only ever searched with vectors from the encoder that built it.
    """

    name: str
    version: str
    token_dim: int
    vector_dim: int = VECTOR_DIM

    @property
    def spec(self) -> dict[str, str | int]:
        """What a collection records about the encoder that filled it."""
        return {
            "encoder": self.name,
            "encoder_version": self.version,
            "token_dim": self.token_dim,
            "vector_dim": self.vector_dim,
        }

    def encode(self, images: Sequence[Image.Image]) -> Embedding:
        """Encode RGB photos of any size; returns one row per photo, in order."""
        if not images:
            return Embedding(
                np.zeros((0, NUM_TOKENS, self.token_dim), np.float32),
                np.zeros((0, self.vector_dim), np.float32),
            )
        return self._encode(images)

    @abc.abstractmethod
    def _encode(self, images: Sequence[Image.Image]) -> Embedding:
        """Encode a non-empty batch."""


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-8) -> np.ndarray:
    """Scale rows of `x` to unit L2 norm along `axis` (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def tokens_to_vector(tokens: np.ndarray, dim: int = VECTOR_DIM, seed: int = 0) -> np.ndarray:
    """Compact index vectors from token grids by a fixed random projection (Johnson-Lindenstrauss).

    Each token is L2-normalized first (so every grid cell weighs the same), then the flattened
    (64 * d) grid is projected to `dim` with a seeded Gaussian matrix, which preserves inner products
    (hence layout similarity) in expectation, and needs no training.

    Args:
        tokens: (B, 64, d) float.
    Returns:
        (B, dim) float32, unit L2 norm.
    """
    batch, num, depth = tokens.shape
    flat = l2_normalize(tokens.astype(np.float32)).reshape(batch, num * depth)  # (B, 64*d)
    return l2_normalize(flat @ _projection(num * depth, dim, seed)).astype(np.float32)


@functools.cache
def _projection(rows: int, cols: int, seed: int) -> np.ndarray:
    """(rows, cols) seeded Gaussian matrix, scaled so projected norms are preserved on average."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols))
