"""Indexing: idempotent, resumable, robust to bad photos, same result from a folder or from S3."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.retriever.ingest import Ingestor
from services.retriever.sources import list_photos
from services.retriever.token_store import TokenStore
from shared.annotations import AnnotatedPhoto
from shared.errors import IncompatibleCollectionError, ProCropError
from shared.images import content_hash, load_image
from shared.storage import build_object_store


def _ingest(settings, encoder, index, store, folder, **kwargs):
    photos = list_photos(str(folder), settings)
    return Ingestor("photos", encoder, index, store, **kwargs).run(photos, batch_size=4)


def test_index_then_rerun_adds_nothing(settings, encoder, index, store, photo_dir):
    first = _ingest(settings, encoder, index, store, photo_dir)
    again = _ingest(settings, encoder, index, store, photo_dir)
    assert (first.added, first.already_present, first.failed) == (6, 0, [])
    assert (again.added, again.already_present) == (0, 6)
    assert index.count("photos") == 6


def test_tokens_are_sharded_and_round_trip(settings, encoder, index, store, photo_dir):
    _ingest(settings, encoder, index, store, photo_dir)
    shards = list(store.list("collections/photos/tokens/"))
    assert len(shards) == 2  # 6 photos in batches of 4, not one object per photo
    path = sorted(photo_dir.glob("*.jpg"))[0]
    expected = encoder.encode([load_image(path)])
    hit = index.search("photos", expected.vectors, 1)[0][0]
    assert hit.content_hash == content_hash(path.read_bytes())
    assert (hit.width, hit.height) == load_image(path).size
    tokens = TokenStore(store, "photos").read(hit.tokens_key, hit.token_row)
    np.testing.assert_allclose(tokens, expected.tokens[0], atol=2e-3, rtol=2e-3)  # stored fp16


def test_interrupted_run_resumes_to_the_full_set(settings, encoder, index, store, photo_copy):
    photos = list_photos(str(photo_copy), settings)
    Ingestor("photos", encoder, index, store).run(photos[:3], batch_size=2)  # "interrupted"
    report = Ingestor("photos", encoder, index, store).run(photos, batch_size=2)
    assert (report.added, report.already_present) == (3, 3)
    assert index.count("photos") == 6


def test_bad_photos_are_reported_and_the_rest_indexed(settings, encoder, index, store, photo_copy):
    (photo_copy / "empty.jpg").write_bytes(b"")
    (photo_copy / "garbage.png").write_bytes(b"not an image at all")
    good = (photo_copy / "chelsea.jpg").read_bytes()
    (photo_copy / "truncated.jpg").write_bytes(good[: len(good) // 3])
    shutil.copy(photo_copy / "coffee.jpg", photo_copy / "coffee_copy.jpg")
    report = _ingest(settings, encoder, index, store, photo_copy)
    failed = {Path(uri).name for uri, _ in report.failed}
    assert failed == {"empty.jpg", "garbage.png", "truncated.jpg"}
    assert (report.added, report.duplicates) == (6, 1)
    assert index.count("photos") == 6


def test_nothing_readable_leaves_no_collection(settings, encoder, index, store, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    report = _ingest(settings, encoder, index, store, tmp_path / "bad")
    assert report.added == 0 and len(report.failed) == 1
    assert not index.has_collection("photos")


def test_pixel_cap_rejects_huge_photos(settings, encoder, index, store, photo_copy):
    # The six samples are at most 256x256 = 65,536 pixels: under the cap; the huge one is over.
    Image.new("RGB", (400, 300), (90, 140, 200)).save(photo_copy / "huge.jpg")
    report = Ingestor("photos", encoder, index, store, max_pixels=100_000).run(
        list_photos(str(photo_copy), settings)
    )
    ((uri, why),) = report.failed
    assert Path(uri).name == "huge.jpg"
    assert "400x300 = 120,000 pixels is over the limit of 100,000" in why
    assert (report.added, report.duplicates) == (6, 0)
    assert index.count("photos") == 6


def test_annotations_are_stored(settings, encoder, index, store, photo_dir):
    labels = {"rocket.jpg": AnnotatedPhoto("rocket.jpg", 256, 171, ((0.1, 0.2, 0.6, 0.9),))}
    _ingest(settings, encoder, index, store, photo_dir, annotations=labels)
    vector = encoder.encode([load_image(photo_dir / "rocket.jpg")]).vectors
    hit = index.search("photos", vector, 1)[0][0]
    assert hit.crops_norm == [[0.1, 0.2, 0.6, 0.9]]


def test_other_encoder_is_refused(settings, encoder, index, store, photo_dir):
    _ingest(settings, encoder, index, store, photo_dir)

    class Other(type(encoder)):  # same tokens, another name: must not share a collection
        version = "999"

    with pytest.raises(IncompatibleCollectionError):
        Ingestor("photos", Other(), index, store)


def test_s3_source_matches_folder_source(s3_settings, encoder, photo_dir, tmp_path):
    source = build_object_store(s3_settings, bucket="photo-source")
    for path in photo_dir.glob("*.jpg"):
        source.put(f"pro/set1/{path.name}", path.read_bytes(), "image/jpeg")
    source.put("pro/set1/notes.txt", b"not a photo")
    photos = list_photos("s3://photo-source/pro", s3_settings)
    assert sorted(p.name for p in photos) == sorted(
        f"set1/{p.name}" for p in photo_dir.glob("*.jpg")
    )
    from shared.vector_index import open_index

    index = open_index(s3_settings)
    store = build_object_store(s3_settings)
    report = Ingestor("photos", encoder, index, store).run(photos)
    assert report.added == 6 and index.count("photos") == 6
    assert len(list(store.list("collections/photos/tokens/"))) == 1
    vector = encoder.encode([Image.open(photo_dir / "astronaut.jpg").convert("RGB")]).vectors
    assert (
        index.search("photos", vector, 1)[0][0].source == "s3://photo-source/pro/set1/astronaut.jpg"
    )


def test_missing_source_folder(settings, tmp_path):
    with pytest.raises(ProCropError, match="no such folder"):
        list_photos(str(tmp_path / "nope"), settings)
