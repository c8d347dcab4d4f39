"""The Milvus index, against Milvus Lite (a file, and the gRPC server mode) - never a fake."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from procrop.servers import free_port, start_milvus_lite
from shared.errors import CollectionNotFoundError, IncompatibleCollectionError, VectorIndexError
from shared.vector_index import IndexConfig, IndexedPhoto, VectorIndex, photo_id

SPEC = {"encoder": "test", "encoder_version": "1", "token_dim": 4, "vector_dim": 8}


def _photos(n: int, seed: int = 0) -> list[IndexedPhoto]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        IndexedPhoto(
            content_hash=hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
            vector=vectors[i],
            source=f"photos/{i}.jpg",
            tokens_key="collections/c/tokens/x.safetensors",
            token_row=i,
            width=640,
            height=480,
            crops_norm=[[0.1, 0.2, 0.9, 0.8]] if i % 2 else [],
        )
        for i in range(n)
    ]


@pytest.fixture
def index(tmp_path: Path) -> VectorIndex:
    return VectorIndex(str(tmp_path / "milvus.db"))


def test_metadata_round_trip_and_compatibility(index):
    index.ensure_collection("c", SPEC)
    assert {k: index.metadata("c")[k] for k in SPEC} == SPEC
    index.ensure_collection("c", SPEC)  # again: a no-op
    with pytest.raises(IncompatibleCollectionError, match="built with"):
        index.ensure_collection("c", {**SPEC, "encoder": "other"})


def test_unknown_collection(index):
    with pytest.raises(CollectionNotFoundError, match="no collection 'nope'"):
        index.count("nope")


def test_upsert_is_idempotent(index):
    photos = _photos(20)
    index.ensure_collection("c", SPEC)
    index.upsert("c", photos)
    index.upsert("c", photos[:7])
    index.flush("c")
    assert index.count("c") == 20
    assert index.existing_hashes("c", [p.content_hash for p in photos[:3]] + ["f" * 64]) == {
        p.content_hash for p in photos[:3]
    }


def test_search_returns_rows_best_first(index):
    photos = _photos(30)
    index.ensure_collection("c", SPEC)
    index.upsert("c", photos)
    queries = np.stack([photos[3].vector, photos[4].vector])
    hits = index.search("c", queries, k=5)
    assert [h[0].content_hash for h in hits] == [photos[3].content_hash, photos[4].content_hash]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0][0].crops_norm == [[0.1, 0.2, 0.9, 0.8]] and hits[1][0].crops_norm == []
    assert hits[0][0].id == photo_id(photos[3].content_hash)
    for row in hits:
        scores = [h.score for h in row]
        assert len(row) == 5 and scores == sorted(scores, reverse=True)


def test_stored_vectors_round_trip(index):
    photos = _photos(5)
    index.ensure_collection("c", SPEC)
    index.upsert("c", photos)
    stored = index.vectors("c", [p.content_hash for p in photos])
    for p in photos:
        np.testing.assert_allclose(stored[p.content_hash], p.vector, atol=1e-6)


def test_reopened_in_a_new_client(tmp_path):
    """A collection written by one client is searchable by the next (it must be loaded)."""
    first = VectorIndex(str(tmp_path / "m.db"))
    first.ensure_collection("c", SPEC)
    first.upsert("c", _photos(10))
    first.flush("c")
    first.close()
    second = VectorIndex(str(tmp_path / "m.db"))
    assert second.count("c") == 10
    assert len(second.search("c", _photos(1)[0].vector[None], 3)[0]) == 3


def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(VectorIndexError, match=r"127\.0\.0\.1"):
        VectorIndex(uri, timeout_s=3).list_collections()
    assert time.monotonic() - started < 20


def test_milvus_lite_server_shared_by_two_clients(tmp_path):
    server = start_milvus_lite(tmp_path / "milvus")
    try:
        uri = f"http://127.0.0.1:{server.port}"
        writer, reader = VectorIndex(uri), VectorIndex(uri)
        writer.ensure_collection("c", SPEC)
        writer.upsert("c", _photos(12))
        writer.flush("c")
        assert reader.count("c") == 12
    finally:
        server.stop()


def test_index_build_params_reach_milvus(tmp_path):
    """Milvus Lite silently drops flat build params; ours must arrive (regression)."""
    config = IndexConfig("IVF_FLAT", {"nlist": 4}, {"nprobe": 2})
    index = VectorIndex(str(tmp_path / "m.db"), config=config)
    index.ensure_collection("c", SPEC)
    index.upsert("c", _photos(40))
    index.flush("c")
    described = index._client.describe_index("c", "vector")
    assert described["index_type"] == "IVF_FLAT" and described.get("params") == {"nlist": 4}
