"""Neighbours as the crop model reads them, and the in-memory search over a bundle's index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.retriever.neighbors import BundleRetrieval, Neighbors, neighbors_from
from shared.errors import ModelLoadError

SPEC = {"encoder": "lite", "encoder_version": "1", "token_dim": 2, "vector_dim": 4}


def grid_tokens(k: int, channels: int = 2) -> np.ndarray:
    """(k, 64, channels) tokens whose value is 100 * neighbour + 8 * row + column."""
    cell = np.arange(64, dtype=np.float32)
    values = cell[None] + 100 * np.arange(k, dtype=np.float32)[:, None]  # (k, 64)
    return np.repeat(values[..., None], channels, -1)


def test_neighbors_flipped_mirrors_columns_and_crops() -> None:
    crops = np.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0]], np.float32)
    neighbors = Neighbors(grid_tokens(2), crops, np.array([True, False]))
    flipped = neighbors.flipped()
    row, col = np.divmod(np.arange(64), 8)
    mirrored = 8 * row + (7 - col)  # cell (row, col) now holds what was at (row, 7 - col)
    np.testing.assert_array_equal(flipped.tokens[0, :, 0], mirrored)
    np.testing.assert_array_equal(flipped.tokens[1, :, 1], 100 + mirrored)
    np.testing.assert_allclose(flipped.crops, [[0.5, 0.2, 0.9, 0.9], [0, 0, 0, 0]], atol=1e-7)
    assert flipped.crops.dtype == np.float32
    np.testing.assert_array_equal(flipped.has_crop, [True, False])
    twice = flipped.flipped()
    np.testing.assert_array_equal(twice.tokens, neighbors.tokens)
    np.testing.assert_allclose(twice.crops, neighbors.crops, atol=1e-7)
    np.testing.assert_array_equal(neighbors.tokens, grid_tokens(2))  # the original is untouched


def test_neighbors_from_pads_and_cuts_to_k() -> None:
    tokens = grid_tokens(2)
    padded = neighbors_from(tokens, [[0.1, 0.1, 0.5, 0.5], None], k=3)
    assert padded.tokens.shape == (3, 64, 2) and padded.tokens.dtype == np.float32
    assert not padded.tokens[2].any()
    np.testing.assert_array_equal(padded.has_crop, [True, False, False])
    np.testing.assert_allclose(padded.crops, [[0.1, 0.1, 0.5, 0.5], [0] * 4, [0] * 4])
    cut = neighbors_from(grid_tokens(4), [None, [0, 0, 1, 1], None, [0, 0, 1, 1]], k=2)
    np.testing.assert_array_equal(cut.tokens, grid_tokens(2))
    np.testing.assert_array_equal(cut.has_crop, [False, True])
    empty = neighbors_from(np.zeros((0, 64, 2)), [], k=2)
    assert empty.tokens.shape == (2, 64, 2) and not empty.has_crop.any()


def test_median_crop_skips_neighbours_without_crops() -> None:
    crops = [[0.0, 0.0, 0.5, 0.5], None, [0.2, 0.2, 0.9, 0.9], [0.1, 0.4, 0.7, 0.6]]
    found = neighbors_from(grid_tokens(4), crops, k=4)
    np.testing.assert_allclose(found.median_crop(), [0.1, 0.2, 0.7, 0.6], atol=1e-7)
    assert neighbors_from(grid_tokens(2), [None, None], k=2).median_crop() is None


def test_transfer_crop_is_the_median_of_the_wider_set_and_mirrors() -> None:
    crops = [[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9], None, [0.3, 0.1, 1.0, 0.8], [0.4] * 4]
    found = neighbors_from(grid_tokens(2), crops, k=2, transfer_k=4)
    assert found.tokens.shape == (2, 64, 2) and found.crops.shape == (2, 4)  # the model reads k
    np.testing.assert_allclose(found.median_crop(), [0.2, 0.1, 0.9, 0.8], atol=1e-7)  # first 4
    np.testing.assert_allclose(found.flipped().median_crop(), [0.1, 0.1, 0.8, 0.8], atol=1e-7)
    np.testing.assert_array_equal(found.samples(), [crops[0], crops[1], crops[3]])  # first 4
    np.testing.assert_allclose(found.flipped().samples()[2], [0.0, 0.1, 0.7, 0.8], atol=1e-7)
    narrow = neighbors_from(grid_tokens(2), crops, k=2)  # transfer_k 0: the k
    assert narrow.wide is None
    np.testing.assert_allclose(narrow.samples(), crops[:2], atol=1e-7)
    nothing = neighbors_from(grid_tokens(2), [None] * 5, k=2, transfer_k=5)
    assert nothing.median_crop() is None and nothing.samples().shape == (0, 4)


def _bundle_index(path: Path, vectors: np.ndarray, hashes: list[str]) -> Path:
    """An `index.safetensors` as `export_index` writes it: photo i has crop [i/10, 0, 1, 1]."""
    n = len(hashes)
    arrays = {
        "vectors": vectors.astype(np.float32),
        "tokens": grid_tokens(n).astype(np.float16),
        "crops": np.asarray([[i / 10, 0, 1, 1] for i in range(n)], np.float32),
        "has_crop": np.ones(n, bool),
        "sizes": np.full((n, 2), 100, np.int32),
    }
    meta = {
        "collection": "tiny",
        "encoder": json.dumps(SPEC),
        "photos": json.dumps([[h, f"{h}.jpg"] for h in hashes]),
    }
    save_file(arrays, str(path), metadata=meta)
    return path


def test_bundle_search_is_exact_top_k_and_never_returns_the_query(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 4))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    hashes = [f"h{i}" for i in range(6)]
    retrieval = BundleRetrieval(_bundle_index(tmp_path / "index.safetensors", vectors, hashes), 3)
    # Photo 2 of the index asks: it is its own nearest vector, and must not come back.
    [own, stranger] = retrieval.neighbors(vectors[[2, 2]], ["h2", None])
    expected = [i for i in np.argsort(-(vectors @ vectors[2])) if i != 2][:3]
    np.testing.assert_allclose(own.crops[:, 0], np.asarray(expected) / 10, atol=1e-6)
    np.testing.assert_array_equal(own.tokens[:, 0, 0], 100 * np.asarray(expected))
    assert stranger.crops[0, 0] == pytest.approx(0.2)  # a photo outside the index gets photo 2


def test_bundle_search_refuses_another_encoder(tmp_path: Path) -> None:
    path = _bundle_index(tmp_path / "index.safetensors", np.eye(4)[:3], ["a", "b", "c"])
    with pytest.raises(ModelLoadError, match="another encoder"):
        BundleRetrieval(path, 2, {**SPEC, "encoder": "sam"})


def test_bundle_search_takes_the_transfer_crop_from_more_photos_than_k(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((9, 4))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = _bundle_index(tmp_path / "index.safetensors", vectors, [f"h{i}" for i in range(9)])
    query = rng.standard_normal((1, 4))
    order = np.argsort(-(vectors @ query[0]))
    [found] = BundleRetrieval(path, 2, transfer_k=5).neighbors(query, [None])
    np.testing.assert_array_equal(found.tokens[:, 0, 0], 100 * order[:2])
    np.testing.assert_allclose(found.crops[:, 0], order[:2] / 10, atol=1e-6)
    assert found.median_crop()[0] == pytest.approx(np.median(order[:5]) / 10)
    [narrow] = BundleRetrieval(path, 2).neighbors(query, [None])
    assert narrow.median_crop()[0] == pytest.approx(np.median(order[:2]) / 10)
