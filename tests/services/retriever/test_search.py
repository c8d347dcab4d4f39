"""Search and precomputed relations: never self, best first, batched == single, stored == encoded."""

from __future__ import annotations

import numpy as np
import pytest

from services.retriever.ingest import Ingestor
from services.retriever.relations import compute_relations, read_relations, write_relations
from services.retriever.search import Query, Retriever, median_crop
from services.retriever.sources import list_photos
from shared.images import content_hash, load_image
from shared.vector_index import Neighbor


@pytest.fixture
def retriever(settings, encoder, index, store, photo_dir) -> Retriever:
    Ingestor("photos", encoder, index, store).run(list_photos(str(photo_dir), settings))
    return Retriever("photos", encoder, index)


def _query(path) -> Query:
    return Query(path.name, content_hash(path.read_bytes()), load_image(path))


def test_a_photo_is_not_its_own_neighbour(retriever, photo_dir):
    for path in sorted(photo_dir.glob("*.jpg")):
        hits = retriever.search([_query(path)], k=5)[0]
        assert len(hits) == 5
        assert content_hash(path.read_bytes()) not in {h.content_hash for h in hits}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_an_outside_photo_can_match_anything(retriever, photo_dir):
    path = photo_dir / "coins.jpg"
    outside = Query("new", "0" * 64, load_image(path))  # same pixels, unknown hash
    hits = retriever.search([outside], k=1)[0]
    assert hits[0].content_hash == content_hash(path.read_bytes())
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_batched_equals_one_by_one(retriever, photo_dir):
    queries = [_query(p) for p in sorted(photo_dir.glob("*.jpg"))]
    batched = retriever.search(queries, k=3)
    single = [retriever.search([q], k=3)[0] for q in queries]
    assert [[h.id for h in row] for row in batched] == [[h.id for h in row] for row in single]


def test_relations_file(retriever, settings, photo_dir, tmp_path):
    photos = list_photos(str(photo_dir), settings)
    relations = compute_relations(retriever, photos, k=3)
    write_relations(relations, tmp_path / "rel.json")
    loaded = read_relations(tmp_path / "rel.json")
    assert loaded["k"] == 3 and loaded["encoder"] == retriever.encoder.spec
    assert set(loaded["photos"]) == {p.name for p in photos}
    for name, entry in loaded["photos"].items():
        assert entry["content_hash"] == content_hash((photo_dir / name).read_bytes())
        neighbours = entry["neighbors"]
        assert len(neighbours) == 3
        assert entry["content_hash"] not in {n["content_hash"] for n in neighbours}
        direct = retriever.search([_query(photo_dir / name)], k=3)[0]  # stored == re-encoded
        assert [n["content_hash"] for n in neighbours] == [h.content_hash for h in direct]


def test_median_crop():
    def hit(crops):
        return Neighbor(0, 0.5, "h", "s", "k", 0, 10, 10, crops)

    hits = [
        hit([[0.0, 0.0, 1.0, 1.0]]),
        hit([[0.2, 0.2, 0.6, 0.6]]),
        hit([]),
        hit([[0.1, 0.3, 0.8, 0.7]]),
    ]
    np.testing.assert_allclose(median_crop(hits), [0.1, 0.2, 0.8, 0.7])
    assert median_crop([hit([])]) is None
