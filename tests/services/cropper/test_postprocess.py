"""Post-processing of crop proposals: near-duplicate suppression, aspect-ratio parsing and fitting."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from services.cropper.postprocess import (
    NEAR_DUPLICATE_IOU,
    CropRequest,
    cover_samples,
    fit_aspect_ratio,
    parse_aspect_ratio,
    ratio_value,
    round_to_pixels,
    select_crops,
    suppress_near_duplicates,
)
from shared.boxes import box_iou

# --- suppress_near_duplicates ----------------------------------------------------------------

# In a 100 x 100 photo. IoUs: (0, 1) = 95 / 100, (0, 2) = 50 / 100, (0, 3) = 45 / 100,
# (2, 3) = 4500 / 5000 = 0.9.
BOXES = np.array([[0, 0, 100, 100], [0, 0, 100, 95], [0, 0, 50, 100], [0, 0, 50, 90]], float)
SCORES = np.array([0.9, 0.8, 0.7, 0.95])


def test_nms_by_hand() -> None:
    # 3 first; 0 (IoU 0.45 with 3) kept; 1 (0.95 with 0) and 2 (0.9 with 3) are near duplicates.
    assert suppress_near_duplicates(BOXES, SCORES).tolist() == [3, 0]


def test_nms_keeps_iou_equal_to_threshold() -> None:
    # At 0.95, box 1 (IoU exactly 0.95 with 0) survives, and so does box 2 (IoU 0.9 with 3).
    assert suppress_near_duplicates(BOXES, SCORES, iou_threshold=0.95).tolist() == [3, 0, 1, 2]
    assert suppress_near_duplicates(BOXES, SCORES, iou_threshold=0.9).tolist() == [3, 0, 2]


def test_nms_max_keep_and_threshold_one() -> None:
    assert suppress_near_duplicates(BOXES, SCORES, max_keep=1).tolist() == [3]
    assert suppress_near_duplicates(BOXES, SCORES, 1.0, max_keep=3).tolist() == [3, 0, 1]


def test_nms_only_kept_crops_suppress() -> None:
    # 1 is suppressed by 0 (IoU 0.88); 2 overlaps 1 at 76 / 88 > 0.85 but 0 only at 0.76: kept.
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 88], [0, 0, 100, 76]], float)
    kept = suppress_near_duplicates(boxes, np.array([0.9, 0.8, 0.7]), iou_threshold=0.85)
    assert kept.tolist() == [0, 2]


def test_nms_equal_scores_keep_the_earlier_index() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], float)
    assert suppress_near_duplicates(boxes, np.ones(3)).tolist() == [0, 2]


def test_nms_empty() -> None:
    kept = suppress_near_duplicates(np.zeros((0, 4)), np.zeros(0))
    assert kept.dtype == np.int64
    assert kept.shape == (0,)


def test_nms_invariants_on_random_crops() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, size=(60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(50, 60, size=(60, 2))], axis=1)
    scores = rng.uniform(size=60)
    kept = suppress_near_duplicates(boxes, scores)
    ious = box_iou(boxes, boxes)
    assert np.all(np.diff(scores[kept]) <= 0)  # best first
    assert np.all(ious[np.ix_(kept, kept)][~np.eye(len(kept), dtype=bool)] <= NEAR_DUPLICATE_IOU)
    for i in set(range(60)) - set(kept.tolist()):  # each dropped crop has a better kept twin
        twins = kept[(ious[i, kept] > NEAR_DUPLICATE_IOU) & (scores[kept] >= scores[i])]
        assert len(twins) > 0
    assert suppress_near_duplicates(boxes, scores, max_keep=3).tolist() == kept[:3].tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": SCORES[:3]}, "scores must be 4 finite"),
        ({"scores": np.array([0.1, np.nan, 0.2, 0.3])}, "scores must be 4 finite"),
        ({"iou_threshold": 0.0}, "iou_threshold must be in"),
        ({"max_keep": 0}, "max_keep must be >= 1"),
        (
            {"boxes_xyxy": np.array([[0, 0, 10, 10], [5, 5, 5, 9], [0, 0, 1, 1], [0, 0, 2, 2]])},
            "x2 > x1",
        ),
    ],
)
def test_nms_errors(kwargs: dict, message: str) -> None:
    arguments = {"boxes_xyxy": BOXES, "scores": SCORES} | kwargs
    with pytest.raises(ValueError, match=message):
        suppress_near_duplicates(**arguments)


# --- parse_aspect_ratio ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16:9", (16, 9)),
        ("32:18", (32, 18)),
        (" 4 : 3 ", (4, 3)),
        ("1.91:1", 1.91),
        ("4:3.5", 4 / 3.5),
        (".5:1", 0.5),
        ("2.:1", 2.0),
        ("10:1", (10, 1)),  # the documented range's ends
        ("1:10", (1, 10)),
        ("1:9.99", 1 / 9.99),
    ],
)
def test_parse_aspect_ratio(text: str, expected: tuple[int, int] | float) -> None:
    parsed = parse_aspect_ratio(text)
    assert parsed == expected
    assert type(parsed) is type(expected)


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "0:1",
        "1:0",
        "0.0:1",
        "-1:2",
        "1:",
        ":1",
        "1:2:3",
        "inf:1",
        "nan:1",
        "1e3:1",
        "",
        "16x9",
        "11:1",  # outside 1:10 to 10:1
        "1:10.5",
        "100000:1",
        "100000000000000000:1",
        "16:\t9",  # spaces only: other whitespace came back in the label
        "16\u00a0:9",
        "16:9\n",
        "\u0661\u0666:\u0669",  # Arabic-Indic digits
        "\uff11\uff16:\uff19",  # full-width digits
    ],
)
def test_parse_aspect_ratio_errors_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_aspect_ratio(text)


def test_long_ratio_text_is_refused_and_cut_in_the_error() -> None:
    text = "1" * 5000 + ":1"
    with pytest.raises(ValueError, match="W:H") as info:
        parse_aspect_ratio(text)
    assert len(str(info.value)) < 200


def test_ratio_value() -> None:
    assert ratio_value((16, 9)) == 16 / 9
    assert ratio_value(1.5) == 1.5
    for bad in (0.0, -1.0, math.inf, math.nan, (1, 0), (-16, -9)):
        with pytest.raises(ValueError, match="positive"):
            ratio_value(bad)


# --- fit_aspect_ratio ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "ratio", "size", "expected"),
    [
        # Already 16:9 (160 x 90): unchanged.
        ([10, 20, 170, 110], (16, 9), (200, 200), [10, 20, 170, 110]),
        # Area 400 at 4:1: 40 x 10 about the same centre (50, 50).
        ([40, 40, 60, 60], 4.0, (100, 100), [30, 45, 70, 55]),
        # Area 3600 at 4:1 is 120 x 30, wider than the square photo: shrunk to 100 x 25.
        ([20, 20, 80, 80], (4, 1), (100, 100), [0, 37.5, 100, 62.5]),
        # ... and at 1:4 full height.
        ([20, 20, 80, 80], 0.25, (100, 100), [37.5, 0, 62.5, 100]),
        # Area 1600 at 4:1 is 80 x 20 about (80, 20): x spans 40..120, shifted left by 20.
        ([60, 0, 100, 40], 4.0, (100, 100), [20, 10, 100, 30]),
        # A 4:1 photo asked for 4:1: the whole photo.
        ([0, 0, 400, 100], 4.0, (400, 100), [0, 0, 400, 100]),
    ],
)
def test_fit_aspect_ratio_by_hand(
    box: list[float],
    ratio: tuple[int, int] | float,
    size: tuple[int, int],
    expected: list[float],
) -> None:
    assert fit_aspect_ratio(np.array(box, float), ratio, *size) == pytest.approx(expected)


def _random_cases(n: int) -> list[tuple[np.ndarray, float, int, int]]:
    """Seeded (box xyxy inside the photo, ratio in [1/6, 6], photo width, photo height)."""
    rng = np.random.default_rng(42)
    cases = []
    for _ in range(n):
        width, height = (int(v) for v in rng.integers(50, 2000, size=2))
        x1, x2 = np.sort(rng.uniform(0, width, size=2))
        y1, y2 = np.sort(rng.uniform(0, height, size=2))
        box = np.array([x1, y1, max(x2, x1 + 10), max(y2, y1 + 10)])
        cases.append((box, float(np.exp(rng.uniform(-math.log(6), math.log(6)))), width, height))
    return cases


def test_fit_aspect_ratio_invariants_on_random_boxes() -> None:
    for box, ratio, width, height in _random_cases(500):
        x1, y1, x2, y2 = fitted = fit_aspect_ratio(box, ratio, width, height)
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert (x2 - x1) / (y2 - y1) == pytest.approx(ratio, rel=1e-12)
        area, new_area = (box[2] - box[0]) * (box[3] - box[1]), (x2 - x1) * (y2 - y1)
        assert new_area <= area * (1 + 1e-12)  # only ever shrunk to fit
        if x2 - x1 < width * (1 - 1e-9) and y2 - y1 < height * (1 - 1e-9):  # not shrunk
            assert new_area == pytest.approx(area, rel=1e-12)
        assert fit_aspect_ratio(fitted, ratio, width, height) == pytest.approx(fitted)


def test_fit_aspect_ratio_keeps_the_centre_when_it_fits() -> None:
    fitted = fit_aspect_ratio(np.array([30.0, 40.0, 70.0, 60.0]), 1.0, 100, 100)
    assert fitted == pytest.approx(
        [50 - math.sqrt(200), 50 - math.sqrt(200), 50 + math.sqrt(200), 50 + math.sqrt(200)]
    )


def test_fit_aspect_ratio_accepts_parsed_ratios() -> None:
    box = np.array([5.0, 5.0, 50.0, 80.0])
    fitted = fit_aspect_ratio(box, parse_aspect_ratio("16:9"), 100, 90)
    assert fitted.tolist() == fit_aspect_ratio(box, 16 / 9, 100, 90).tolist()


def test_fit_aspect_ratio_errors() -> None:
    box = np.array([0.0, 0.0, 10.0, 10.0])
    with pytest.raises(ValueError, match="positive and finite"):
        fit_aspect_ratio(box, 0.0, 100, 100)
    with pytest.raises(ValueError, match="photo size must be positive"):
        fit_aspect_ratio(box, 1.0, 0, 100)
    with pytest.raises(ValueError, match="x2 > x1"):
        fit_aspect_ratio(np.array([10.0, 0.0, 10.0, 10.0]), 1.0, 100, 100)


# --- round_to_pixels -------------------------------------------------------------------------


def test_round_to_pixels_exact_ratio_is_unchanged() -> None:
    box = np.array([10.0, 20.0, 170.0, 110.0])  # 160 x 90
    assert round_to_pixels(box, (16, 9), 200, 200).tolist() == [10, 20, 170, 110]


def test_round_to_pixels_by_hand() -> None:
    # 100 x 25.5 at 4:1 in a 100 x 100 photo: height 25 -> width 100 (exact); height 26 -> width
    # 104, clamped to 100 (ratio error 4 - 100 / 26). 100 x 25 wins, top edge at 50 - 12.5 -> 38.
    rounded = round_to_pixels(np.array([0.0, 37.25, 100.0, 62.75]), 4.0, 100, 100)
    assert rounded.tolist() == [0, 38, 100, 63]


def test_round_to_pixels_invariants_on_random_boxes() -> None:
    for box, ratio, width, height in _random_cases(500):
        fitted = fit_aspect_ratio(box, ratio, width, height)
        x1, y1, x2, y2 = rounded = round_to_pixels(fitted, ratio, width, height)
        assert rounded.dtype == np.int64
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        h_floor = max(math.floor(fitted[3] - fitted[1]), 1)
        assert abs((x2 - x1) / (y2 - y1) - ratio) <= 0.5 / h_floor + 1e-12
        # Near the float crop: a height step of 1 px moves the width by the ratio.
        assert np.abs(rounded - fitted).max() <= max(ratio, 1) + 1


def test_fuse_with_transfer_moves_the_best_proposal_only() -> None:
    from services.cropper.postprocess import fuse_with_transfer

    scores = np.array([0.2, 0.9, 0.5])
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.6, 0.6], [0.1, 0.1, 0.9, 0.9]])
    transfer = np.array([0.0, 0.0, 0.8, 1.0])
    fused = fuse_with_transfer(scores, boxes, transfer, 0.25)
    np.testing.assert_allclose(fused[1], 0.75 * boxes[1] + 0.25 * transfer)
    np.testing.assert_array_equal(fused[[0, 2]], boxes[[0, 2]])
    np.testing.assert_array_equal(boxes[1], [0.2, 0.2, 0.6, 0.6])  # the input is not changed
    assert fuse_with_transfer(scores, boxes, None, 0.5) is boxes  # no neighbour had a crop
    assert fuse_with_transfer(scores, boxes, transfer, 0.0) is boxes


# --- cover_samples: alternatives that cover the plausible expert crops ------------------------

# In a 100 x 100 photo: the best proposal is the left half; proposal 1 is a near copy of it
# (IoU 0.8, not a near duplicate at 0.85), proposal 2 the right half (IoU 0 with 0).
COVER_BOXES = np.array([[0, 0, 50, 100], [0, 0, 50, 80], [50, 0, 100, 100]], float)
COVER_SCORES = np.array([0.9, 0.8, 0.3])
LEFT, RIGHT = [0, 0, 50, 100], [50, 0, 100, 100]


def test_cover_samples_picks_the_crop_that_covers_what_the_best_misses() -> None:
    samples = np.array([LEFT, LEFT, RIGHT])  # a third of the experts would crop the right half
    assert suppress_near_duplicates(COVER_BOXES, COVER_SCORES, max_keep=2).tolist() == [0, 1]
    assert cover_samples(COVER_BOXES, COVER_SCORES, samples, 2).tolist() == [0, 2]
    # Every sample already covered as well as it can be: the tie goes to the better score.
    assert cover_samples(COVER_BOXES, COVER_SCORES, np.array([LEFT]), 3).tolist() == [0, 1, 2]


def test_cover_samples_at_threshold_one_never_keeps_a_crop_twice() -> None:
    kept = cover_samples(COVER_BOXES, COVER_SCORES, np.array([LEFT]), 5, iou_threshold=1.0)
    assert sorted(kept.tolist()) == [0, 1, 2]


def test_cover_samples_without_samples_is_nms() -> None:
    for n in (1, 2, 4):
        assert (
            cover_samples(BOXES, SCORES, np.zeros((0, 4)), n).tolist()
            == suppress_near_duplicates(BOXES, SCORES, max_keep=n).tolist()
        )
    assert cover_samples(np.zeros((0, 4)), np.zeros(0), np.array([LEFT]), 3).shape == (0,)


def test_cover_samples_invariants_on_random_crops() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 40, size=(60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(50, 60, size=(60, 2))], axis=1)
    scores = rng.uniform(size=60)
    sxy = rng.uniform(0, 30, size=(30, 2))
    samples = np.concatenate([sxy, sxy + rng.uniform(40, 70, size=(30, 2))], axis=1)
    kept = cover_samples(boxes, scores, samples, 5)
    assert kept[0] == np.argmax(scores) and len(set(kept.tolist())) == len(kept) == 5
    ious, reach = box_iou(boxes, boxes), box_iou(boxes, samples)
    assert np.all(ious[np.ix_(kept, kept)][~np.eye(5, dtype=bool)] <= NEAR_DUPLICATE_IOU)

    def coverage(chosen: list[int]) -> float:
        return float(reach[chosen].max(0).mean())

    for m in range(1, 5):  # each pick is the allowed crop of greatest coverage
        allowed = [i for i in range(60) if ious[i, kept[:m]].max() <= NEAR_DUPLICATE_IOU]
        best = max(coverage([*kept[:m].tolist(), i]) for i in allowed)
        assert coverage(kept[: m + 1].tolist()) == pytest.approx(best)
    # The greedy set covers the samples at least as well as the best-scored NMS set.
    nms = suppress_near_duplicates(boxes, scores, max_keep=5).tolist()
    assert coverage(kept.tolist()) >= coverage(nms)


def test_select_crops_with_samples_covers_them_for_free_and_ratio_requests() -> None:
    samples = np.array([LEFT, LEFT, RIGHT]) / 100
    free = select_crops(COVER_SCORES, COVER_BOXES / 100, 100, 100, CropRequest(2), samples)
    assert [c.box for c in free.crops] == [(0, 0, 50, 100), (50, 0, 100, 100)]
    plain = select_crops(COVER_SCORES, COVER_BOXES / 100, 100, 100, CropRequest(2))
    assert [c.box for c in plain.crops] == [(0, 0, 50, 100), (0, 0, 50, 80)]
    ratio = select_crops(
        COVER_SCORES, COVER_BOXES / 100, 100, 100, CropRequest.parse(2, ["1:2"]), samples
    )
    assert sorted(c.box for c in ratio.crops) == [(0, 0, 50, 100), (50, 0, 100, 100)]
    assert all(c.aspect_ratio == "1:2" for c in ratio.crops)


def test_select_crops_of_a_tiny_photo_are_distinct_after_rounding() -> None:
    # Three proposals far apart as floats (IoU < 0.85) that round to the same pixels of a 2 x 2
    # photo: the user gets one crop, not three copies of it.
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]])
    assert box_iou(boxes, boxes)[np.triu_indices(3, 1)].max() < NEAR_DUPLICATE_IOU
    scores = np.array([0.9, 0.8, 0.7])
    free = select_crops(scores, boxes, 2, 2, CropRequest(3))
    assert [c.box for c in free.crops] == [(0, 0, 2, 2)]
    ratio = select_crops(scores, boxes, 2, 2, CropRequest.parse(3, ["1:1"]))
    assert [c.box for c in ratio.crops] == [(0, 0, 2, 2)]
    # The same proposals in a 100 x 100 photo stay three crops.
    assert len(select_crops(scores, boxes, 100, 100, CropRequest(3)).crops) == 3


@pytest.mark.parametrize(
    "ratios",
    [["16:9", "16:9"], ["16:9", "32:18"], ["1:1", "4:4"], ["1.5:1", "3:2"], ["2:1", "4:2.0"]],
)
def test_the_same_ratio_twice_is_refused(ratios: list[str]) -> None:
    # Each ratio gets its own n crops: the same ratio twice gave every crop twice.
    with pytest.raises(ValueError, match="are the same ratio") as info:
        CropRequest.parse(3, ratios)
    assert repr(ratios[0]) in str(info.value) and repr(ratios[1]) in str(info.value)
    assert len(CropRequest.parse(3, ["16:9", "9:16", "1.91:1"]).ratios) == 3
