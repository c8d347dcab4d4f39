"""FCDB annotation loading (pixel xywh -> normalized xyxy) and the fixed train/val split."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from shared.annotations import AnnotatedPhoto, fixed_split, load_fcdb
from shared.errors import ProCropError

FCDB_TRAIN = Path(__file__).resolve().parents[3] / "shared/data/fcdb/train/annotations.json"


def _write(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records))
    return path


def _record(image: str, width: int, height: int, xywh: list[float]) -> dict[str, object]:
    return {"image": image, "width": width, "height": height, "crop_xywh": xywh}


def test_pixel_xywh_becomes_normalized_xyxy(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "annotations.json",
        [_record("a.jpg", 200, 100, [20, 10, 100, 50]), _record("b.jpg", 64, 64, [0, 0, 64, 64])],
    )
    photos = load_fcdb(path)
    assert photos == {
        "a.jpg": AnnotatedPhoto("a.jpg", 200, 100, ((0.1, 0.1, 0.6, 0.6),)),
        "b.jpg": AnnotatedPhoto("b.jpg", 64, 64, ((0.0, 0.0, 1.0, 1.0),)),
    }


def test_crop_one_pixel_past_the_photo_is_clipped(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "annotations.json",
        [
            _record("right.jpg", 200, 100, [100, 0, 101, 100]),  # x2 = 201 of 200
            _record("top_left.jpg", 200, 100, [-1, -1, 101, 51]),  # x1 = y1 = -1
        ],
    )
    photos = load_fcdb(path)
    assert photos["right.jpg"].crops_norm == ((0.5, 0.0, 1.0, 1.0),)
    assert photos["top_left.jpg"].crops_norm == ((0.0, 0.0, 0.5, 0.5),)


def test_crop_far_outside_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(
        tmp_path / "annotations.json",
        [
            _record("ok.jpg", 200, 100, [0, 0, 100, 50]),
            _record("far.jpg", 200, 100, [500, 300, 400, 200]),  # in a larger original's pixels
            _record("wide.jpg", 200, 100, [0, 0, 260, 50]),  # 30 % past the right edge
        ],
    )
    with caplog.at_level(logging.WARNING, logger="shared.annotations"):
        photos = load_fcdb(path)
    assert list(photos) == ["ok.jpg"]
    assert str(path) in caplog.text
    assert "skipped 2" in caplog.text


def test_no_warning_when_nothing_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "annotations.json", [_record("ok.jpg", 10, 10, [1, 1, 5, 5])])
    with caplog.at_level(logging.WARNING, logger="shared.annotations"):
        load_fcdb(path)
    assert caplog.records == []


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"image": "a.jpg"}),  # an object, not a list of records
        json.dumps([{"image": "a.jpg", "width": 10, "height": 10}]),  # no crop
        json.dumps([_record("a.jpg", 10, 10, [1, 2])]),  # crop too short
        json.dumps([_record("a.jpg", 0, 10, [0, 0, 1, 1])]),  # zero width
        json.dumps([_record("a.jpg", 10, 10, [2, 2, 0, 5])]),  # empty crop
        json.dumps([_record("a.jpg", "ten", 10, [0, 0, 1, 1])]),  # non-numeric size
    ],
    ids=["not-json", "not-a-list", "no-crop", "short-crop", "zero-width", "empty-crop", "bad-size"],
)
def test_malformed_file_names_the_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ProCropError, match="not an FCDB annotation file") as info:
        load_fcdb(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(ProCropError) as info:
        load_fcdb(path)
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def fcdb_train() -> dict[str, AnnotatedPhoto]:
    if not FCDB_TRAIN.exists():
        pytest.skip(f"FCDB not found at {FCDB_TRAIN}")
    return load_fcdb(FCDB_TRAIN)


def test_real_fcdb_train(fcdb_train: dict[str, AnnotatedPhoto]) -> None:
    records = json.loads(FCDB_TRAIN.read_text())
    assert len(records) == 1369
    assert len(fcdb_train) == 1369 - 32
    boxes = np.array([crop for photo in fcdb_train.values() for crop in photo.crops_norm])
    assert boxes.shape == (1337, 4)
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()


def test_real_fcdb_crops_match_pixels(fcdb_train: dict[str, AnnotatedPhoto]) -> None:
    """Denormalizing a loaded crop gives back the file's pixel box, up to clipping."""
    for record in json.loads(FCDB_TRAIN.read_text()):
        photo = fcdb_train.get(record["image"])
        if photo is None:
            continue
        assert (photo.width, photo.height) == (record["width"], record["height"])
        x, y, w, h = record["crop_xywh"]
        scale = np.array([photo.width, photo.height] * 2)
        expected = np.clip([x, y, x + w, y + h], 0, scale)
        got = np.array(photo.crops_norm[0]) * scale
        np.testing.assert_allclose(got, expected, atol=1e-6 * max(photo.width, photo.height))


NAMES = [f"img_{i:04d}.jpg" for i in range(500)]


def test_fixed_split_sizes_disjoint_and_complete() -> None:
    train, val = fixed_split(NAMES, n_val=200)
    assert (len(train), len(val)) == (300, 200)
    assert not set(train) & set(val)
    assert sorted(train + val) == NAMES
    assert train == sorted(train) and val == sorted(val)


def test_fixed_split_is_deterministic_and_order_independent() -> None:
    shuffled = NAMES.copy()
    random.Random(7).shuffle(shuffled)
    assert fixed_split(NAMES) == fixed_split(NAMES) == fixed_split(shuffled)
    assert fixed_split(NAMES)[1] != fixed_split(NAMES, seed=1)[1]


def test_fixed_split_small_inputs() -> None:
    assert fixed_split(NAMES[:5], n_val=200) == ([], NAMES[:5])
    assert fixed_split(NAMES[:5], n_val=0) == (NAMES[:5], [])
    assert fixed_split([], n_val=3) == ([], [])
