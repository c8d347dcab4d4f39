"""The lite composition descriptor: interface, determinism, and that it describes layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from services.embedder.base import NUM_TOKENS, VECTOR_DIM
from services.embedder.lite import CHANNELS, LiteCompositionEncoder


@pytest.fixture(scope="module")
def encoder() -> LiteCompositionEncoder:
    return LiteCompositionEncoder()


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photo_dir.glob("*.jpg"))]


def test_shapes_and_unit_vectors(encoder, photos):
    emb = encoder.encode(photos)
    assert emb.tokens.shape == (len(photos), NUM_TOKENS, len(CHANNELS))
    assert emb.vectors.shape == (len(photos), VECTOR_DIM)
    assert emb.tokens.dtype == emb.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=1e-5)


def test_empty_batch(encoder):
    emb = encoder.encode([])
    assert emb.tokens.shape == (0, NUM_TOKENS, len(CHANNELS)) and len(emb) == 0


def test_deterministic_and_batched_equals_single(encoder, photos):
    batched = encoder.encode(photos)
    singles = [encoder.encode([p]) for p in photos]
    again = encoder.encode(photos)
    np.testing.assert_array_equal(batched.vectors, again.vectors)
    for i, single in enumerate(singles):
        np.testing.assert_allclose(single.tokens[0], batched.tokens[i], atol=1e-6)
        np.testing.assert_allclose(single.vectors[0], batched.vectors[i], atol=1e-6)


def test_tokens_standardized_per_channel(encoder, photos):
    tokens = encoder.encode(photos[:1]).tokens[0]
    assert np.allclose(tokens.mean(axis=0), 0, atol=1e-4)
    stds = tokens.std(axis=0)
    assert np.all((np.abs(stds - 1) < 1e-3) | (stds < 1e-3))  # unit, or a flat channel


def test_robust_to_scale_and_exposure(encoder, photos):
    photo = photos[0]
    small = photo.resize((photo.width // 2, photo.height // 2), Image.BICUBIC)
    darker = Image.eval(photo, lambda v: int(v * 0.7))
    base, *variants = encoder.encode([photo, small, darker]).vectors
    for vector in variants:
        assert float(base @ vector) > 0.9


def test_sensitive_to_layout(encoder, photos):
    """A mirrored or flipped photo has the same content but another composition."""
    photo = photos[0]
    base, mirrored, flipped = encoder.encode(
        [photo, ImageOps.mirror(photo), ImageOps.flip(photo)]
    ).vectors
    assert float(base @ mirrored) < 0.9 and float(base @ flipped) < 0.9


def test_uniform_image_is_finite(encoder):
    emb = encoder.encode([Image.new("RGB", (300, 200), (120, 40, 200))])
    assert np.isfinite(emb.tokens).all() and np.isfinite(emb.vectors).all()
