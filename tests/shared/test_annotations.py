"""Annotation loading (FCDB, JSON lines, GAICD -> normalized xyxy, best first) and the fixed split."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.annotations import (
    ANNOTATION_FORMATS,
    AnnotatedPhoto,
    fixed_split,
    load_annotations,
    load_fcdb,
    load_gaicd,
    load_jsonl,
)
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
        json.dumps([_record("a.jpg", "ten", 10, [0, 0, 1, 1])]),  # type: ignore[arg-type]  # bad size
        '[{"image": "a.jpg", "width": 1e400, "height": 8, "crop_xywh": [0, 0, 1, 1]}]',  # inf
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser's recursion
    ],
    ids=[
        "not-json",
        "not-a-list",
        "no-crop",
        "short-crop",
        "zero-width",
        "empty-crop",
        "bad-size",
        "infinite-size",
        "nested-100k",
    ],
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


def test_fcdb_photos_have_no_scores(tmp_path: Path) -> None:
    path = _write(tmp_path / "annotations.json", [_record("a.jpg", 10, 10, [1, 1, 5, 5])])
    assert load_fcdb(path)["a.jpg"].scores is None


def test_scores_must_match_crops() -> None:
    with pytest.raises(ValueError, match="2 scores for 1 crops"):
        AnnotatedPhoto("a.jpg", 10, 10, ((0.0, 0.0, 1.0, 1.0),), (1.0, 2.0))


def _image(path: Path, width: int, height: int) -> Path:
    """A real (tiny) image file, so loaders can read its header size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)
    return path


def _lines(path: Path, *lines: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _crop(box: list[float], score: float | None = None) -> dict[str, object]:
    return {"box": box} if score is None else {"box": box, "score": score}


def test_jsonl_pixel_boxes_become_normalized_xyxy_best_first(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg", 200, 100)  # size from the header: the line gives none
    crops = [
        _crop([0, 0, 100, 50], 0.2),
        _crop([20, 10, 120, 60], 0.9),
        _crop([50, 25, 150, 75]),  # default score 1.0
        _crop([0, 0, 200, 100], 0.9),  # ties keep file order
    ]
    path = _lines(
        tmp_path / "crops.jsonl",
        {"image": "a.jpg", "crops": crops},
        "",  # blank lines are allowed
        {"image": "sub/b.png", "width": 64, "height": 32, "crops": [_crop([16, 8, 48, 24], 3)]},
    )
    assert load_jsonl(path) == {
        "a.jpg": AnnotatedPhoto(
            "a.jpg",
            200,
            100,
            (
                (0.25, 0.25, 0.75, 0.75),
                (0.1, 0.1, 0.6, 0.6),
                (0.0, 0.0, 1.0, 1.0),
                (0.0, 0.0, 0.5, 0.5),
            ),
            (1.0, 0.9, 0.9, 0.2),
        ),
        "sub/b.png": AnnotatedPhoto("sub/b.png", 64, 32, ((0.25, 0.25, 0.75, 0.75),), (3.0,)),
    }


def test_jsonl_images_relative_to_image_root(tmp_path: Path) -> None:
    _image(tmp_path / "photos/trip/c.png", 40, 80)
    absolute = _image(tmp_path / "photos/d.jpg", 10, 10)
    path = _lines(
        tmp_path / "labels/crops.jsonl",
        {"image": "trip/c.png", "crops": [_crop([0, 40, 40, 80])]},
        {"image": str(absolute), "crops": [_crop([0, 0, 5, 5])]},
    )
    photos = load_jsonl(path, image_root=tmp_path / "photos")
    assert list(photos) == ["trip/c.png", "d.jpg"]
    assert photos["trip/c.png"].crops_norm == ((0.0, 0.5, 1.0, 1.0),)
    assert (photos["trip/c.png"].width, photos["trip/c.png"].height) == (40, 80)


def test_jsonl_clips_small_overruns_and_skips_far_crops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = {"width": 200, "height": 100}
    path = _lines(
        tmp_path / "crops.jsonl",
        {
            "image": "a.jpg",
            **size,
            "crops": [_crop([100, -1, 201, 100], 2), _crop([0, 0, 260, 50])],
        },
        {"image": "far.jpg", **size, "crops": [_crop([500, 300, 900, 500])]},
        {"image": "none.jpg", **size, "crops": []},
    )
    with caplog.at_level(logging.WARNING, logger="shared.annotations"):
        photos = load_jsonl(path)
    assert photos == {"a.jpg": AnnotatedPhoto("a.jpg", 200, 100, ((0.5, 0.0, 1.0, 1.0),), (2.0,))}
    assert str(path) in caplog.text
    assert "skipped 2 crops" in caplog.text and "skipped 2 photos" in caplog.text


GOOD_LINE = {"image": "a.jpg", "width": 10, "height": 10, "crops": [{"box": [0, 0, 5, 5]}]}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "Expecting property name"),
        ([GOOD_LINE], "must be a JSON object"),
        ({"image": "b.jpg", "width": 10, "height": 10}, "missing key 'crops'"),
        ({**GOOD_LINE, "image": "b.jpg", "crops": [{"box": [0, 0, 5]}]}, "crop 0 box"),
        (
            {**GOOD_LINE, "image": "b.jpg", "crops": [{"box": [0, 0, 5, 5], "score": "high"}]},
            "score",
        ),
        ({**GOOD_LINE, "image": "b.jpg", "crops": [{"box": [5, 0, 5, 5]}]}, "empty crop"),
        ({**GOOD_LINE, "image": "b.jpg", "width": 0}, "bad size"),
        ({"image": "b.jpg", "width": 10, "crops": []}, "missing key 'height'"),
        ({"image": "missing.jpg", "crops": []}, "cannot read the size"),
        (GOOD_LINE, "already listed on line 1"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-crops",
        "short-box",
        "text-score",
        "empty-crop",
        "zero-width",
        "width-only",
        "no-image",
        "duplicate",
    ],
)
def test_jsonl_malformed_line_names_file_and_line(
    tmp_path: Path, line: object, reason: str
) -> None:
    path = _lines(tmp_path / "crops.jsonl", GOOD_LINE, line)
    with pytest.raises(ProCropError, match=reason) as info:
        load_jsonl(path)
    assert f"{path}:2:" in str(info.value)


def test_jsonl_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ProCropError, match=r"missing\.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


def _gaicd_note(folder: Path, stem: str, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return _lines(folder / f"{stem}.txt", *lines)


def test_gaicd_lines_are_y1_x1_y2_x2_mos_ranked_by_mos(tmp_path: Path) -> None:
    """GAICD layout: annotations/NAME.txt next to images/{train,test}/NAME.jpg."""
    _image(tmp_path / "GAIC/images/train/1.jpg", 200, 100)
    _image(tmp_path / "GAIC/images/test/2.jpg", 50, 50)
    notes = tmp_path / "GAIC/annotations"
    _gaicd_note(notes, "1", "10 20 60 120 3.5", "0 0 50 100 4.25", "0 0 100 200 -2")
    _gaicd_note(notes, "2", "0 0 25 50 2.0")
    assert load_gaicd(notes) == {
        "train/1.jpg": AnnotatedPhoto(
            "train/1.jpg", 200, 100, ((0.0, 0.0, 0.5, 0.5), (0.1, 0.1, 0.6, 0.6)), (4.25, 3.5)
        ),
        "test/2.jpg": AnnotatedPhoto("test/2.jpg", 50, 50, ((0.0, 0.0, 1.0, 0.5),), (2.0,)),
    }


def test_gaicd_finds_images_in_split_folder_same_folder_or_image_root(tmp_path: Path) -> None:
    _image(tmp_path / "GAIC/images/train/3.png", 100, 200)  # annotations/train -> images/train
    _gaicd_note(tmp_path / "GAIC/annotations/train", "3", "0 0 100 100 3")
    assert list(load_gaicd(tmp_path / "GAIC/annotations/train")) == ["3.png"]

    _image(tmp_path / "flat/4.jpeg", 100, 100)  # photos beside their annotations
    _gaicd_note(tmp_path / "flat", "4", "0 0 100 100 3")
    assert list(load_gaicd(tmp_path / "flat")) == ["4.jpeg"]

    _image(tmp_path / "elsewhere/5.jpg", 100, 100)
    _gaicd_note(tmp_path / "notes", "5", "0 0 50 50 3")
    photo = load_gaicd(tmp_path / "notes", image_root=tmp_path / "elsewhere")["5.jpg"]
    assert photo.crops_norm == ((0.0, 0.0, 0.5, 0.5),)


def test_gaicd_clips_small_overruns_and_skips_far_crops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _image(tmp_path / "6.jpg", 200, 100)
    _image(tmp_path / "7.jpg", 200, 100)
    _gaicd_note(tmp_path, "6", "-1 100 100 201 3", "0 0 50 260 5")  # x2 = 201 clipped; 260 far
    _gaicd_note(tmp_path, "7", "0 0 50 100 -2")  # no usable candidate left
    with caplog.at_level(logging.WARNING, logger="shared.annotations"):
        photos = load_gaicd(tmp_path)
    assert photos == {"6.jpg": AnnotatedPhoto("6.jpg", 200, 100, ((0.5, 0.0, 1.0, 1.0),), (3.0,))}
    assert "skipped 1 crops" in caplog.text and "skipped 1 photos" in caplog.text


@pytest.mark.parametrize(
    "bad", ["10 20 60", "10 20 60 120 good", "10 20 60 120 nan", "60 20 10 120 3"]
)
def test_gaicd_malformed_line_names_file_and_line(tmp_path: Path, bad: str) -> None:
    _image(tmp_path / "8.jpg", 200, 100)
    note = _gaicd_note(tmp_path, "8", "10 20 60 120 3", bad)
    with pytest.raises(ProCropError) as info:
        load_gaicd(tmp_path)
    assert f"{note}:2:" in str(info.value)


def test_gaicd_missing_photo_or_annotations_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProCropError, match="not a folder of GAICD"):
        load_gaicd(tmp_path)
    note = _gaicd_note(tmp_path, "9", "0 0 10 10 3")
    with pytest.raises(ProCropError, match=r"no photo 9\.jpg") as info:
        load_gaicd(tmp_path)
    assert str(note) in str(info.value)


def test_load_annotations_detects_the_format(tmp_path: Path) -> None:
    fcdb = _write(tmp_path / "annotations.json", [_record("a.jpg", 200, 100, [20, 10, 100, 50])])
    jsonl = _lines(tmp_path / "crops.jsonl", GOOD_LINE)
    _image(tmp_path / "gaicd/images/1.jpg", 200, 100)
    gaicd = _gaicd_note(tmp_path / "gaicd/annotations", "1", "0 0 50 100 4").parent
    assert load_annotations(fcdb) == load_fcdb(fcdb)
    assert load_annotations(jsonl) == load_jsonl(jsonl)
    assert load_annotations(gaicd) == load_gaicd(gaicd)
    assert load_annotations(str(gaicd), image_root=tmp_path / "gaicd/images") == load_gaicd(gaicd)
    renamed = jsonl.rename(tmp_path / "crops.txt")
    assert load_annotations(renamed, fmt="jsonl") == load_jsonl(renamed)
    with pytest.raises(ProCropError, match="cannot tell the annotation format"):
        load_annotations(renamed)


def test_load_annotations_unknown_format_lists_the_choices(tmp_path: Path) -> None:
    assert ANNOTATION_FORMATS == ("auto", "fcdb", "gaicd", "jsonl")
    with pytest.raises(ProCropError, match="'coco'") as info:
        load_annotations(tmp_path / "crops.json", fmt="coco")
    assert all(name in str(info.value) for name in ANNOTATION_FORMATS)


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


@pytest.mark.parametrize(
    "line",
    [
        '{"image": "b.jpg", "width": ' + "9" * 400 + ', "height": 8, "crops": []}',
        '{"image": "b.jpg", "width": 10, "height": 10, "crops": [{"box": [0, 0, 5, '
        + "9" * 400
        + "]}]}",
        '{"image": "b.jpg", "crops": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["400-digit-size", "400-digit-box", "nested-100k"],
)
def test_jsonl_numbers_and_nesting_beyond_python_are_one_error(tmp_path: Path, line: str) -> None:
    path = tmp_path / "crops.jsonl"
    path.write_text(json.dumps(GOOD_LINE) + "\n" + line + "\n")
    with pytest.raises(ProCropError) as info:
        load_jsonl(path)
    assert f"{path}:2:" in str(info.value)


def test_fcdb_photo_listed_twice_is_not_called_outside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([_record("a.jpg", 10, 10, [0, 0, 5, 5])] * 2))
    assert list(load_fcdb(path)) == ["a.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 1 photos listed twice, the last kept"
    ]
