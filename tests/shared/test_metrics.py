"""Crop metrics: IoU, Disp and acc against the best-IoU ground truth; GAICD Acc_K/N."""

from __future__ import annotations

import numpy as np
import pytest

from shared.metrics import (
    CropScores,
    acc_k_n,
    best_iou_and_disp,
    crop_scores,
    gaicd_acc_table,
)


def test_identical_crop() -> None:
    box = np.array([10.0, 20.0, 110.0, 220.0])
    assert best_iou_and_disp(box, box[None], 300, 400) == (1.0, 0.0)


def test_shifted_crop_by_hand() -> None:
    # Shifted 10 px right in a 200 x 100 photo: inter 90 x 100, union 2 * 10000 - 9000 = 11000;
    # Disp = ((10 + 10) / 200 + (0 + 0) / 100) / 4 = 0.025.
    iou, disp = best_iou_and_disp(
        np.array([10, 0, 110, 100]), np.array([[0, 0, 100, 100]]), 200, 100
    )
    assert iou == pytest.approx(9 / 11)
    assert disp == pytest.approx(0.025)


def test_vertical_shift_uses_height() -> None:
    _, disp = best_iou_and_disp(np.array([0, 5, 10, 15]), np.array([0, 0, 10, 10]), 1000, 50)
    assert disp == pytest.approx((5 + 5) / 50 / 4)


def test_disjoint_crop() -> None:
    iou, disp = best_iou_and_disp(np.array([0, 0, 1, 1]), np.array([[2, 2, 3, 3]]), 4, 4)
    assert iou == 0.0
    assert disp == pytest.approx(((2 + 2) / 4 + (2 + 2) / 4) / 4)


def test_several_truths_use_the_best_iou_one_for_disp() -> None:
    pred = np.array([0, 0, 100, 100])
    enclosing = [-30, -30, 130, 130]  # IoU 10000 / 25600, Disp 120 / 800
    thin = [0, 0, 100, 30]  # IoU 0.3, Disp 70 / 800 (lower, but not the best IoU)
    expected = (10000 / 25600, 120 / 800)
    for truths in ([enclosing, thin], [thin, enclosing]):
        iou, disp = best_iou_and_disp(pred, np.array(truths), 200, 200)
        assert (iou, disp) == pytest.approx(expected)


def test_units_do_not_matter() -> None:
    pred, truths = np.array([12, 8, 150, 90]), np.array([[0, 0, 140, 100], [30, 20, 160, 95]])
    pixels = best_iou_and_disp(pred, truths, 160, 100)
    scale = np.array([160, 100, 160, 100])
    norm = best_iou_and_disp(pred / scale, truths / scale, 1, 1)
    assert norm == pytest.approx(pixels)


# --- FCDB / FLMS aggregate: mean IoU, mean Disp, acc (IoU >= 0.85) -------------------------

FULL = [0.0, 0.0, 10.0, 10.0]  # the whole of a 10 x 10 photo


def _three_photos() -> tuple[list[list[float]], list[np.ndarray], list[tuple[int, int]]]:
    """Three 10 x 10 photos with IoU 1, 1/2, 85/100 and Disp 0, 1/8, 3/80."""
    preds = [
        FULL,  # identical: IoU 1, Disp 0
        [0.0, 0.0, 5.0, 10.0],  # left half vs full (IoU 1/2) and right half (IoU 0)
        [0.0, 0.0, 10.0, 8.5],  # 85 inside 100: IoU exactly 0.85, Disp (1.5 / 10) / 4
    ]
    truths = [np.array([FULL]), np.array([FULL, [5, 0, 10, 10]]), np.array([FULL])]
    return preds, truths, [(10, 10)] * 3


def test_crop_scores_by_hand() -> None:
    scores = crop_scores(*_three_photos())
    assert isinstance(scores, CropScores)
    assert scores.iou == pytest.approx((1 + 1 / 2 + 85 / 100) / 3)
    assert scores.disp == pytest.approx((0 + 1 / 8 + 3 / 80) / 3)
    assert scores.acc_iou85 == pytest.approx(2 / 3)  # IoU 1 and exactly 0.85 count, 1/2 does not
    assert scores.photos == 3


def test_crop_scores_as_dict_and_array_input() -> None:
    preds, truths, sizes = _three_photos()
    scores = crop_scores(np.array(preds), truths, sizes)
    assert scores == crop_scores(preds, truths, sizes)
    assert scores.as_dict() == {
        "iou": scores.iou,
        "disp": scores.disp,
        "acc_iou85": scores.acc_iou85,
        "photos": 3,
    }
    with pytest.raises(AttributeError):
        scores.iou = 0.0  # type: ignore[misc]


def test_acc_threshold_boundary() -> None:
    truths, sizes = [np.array([FULL])], [(10, 10)]
    assert crop_scores([[0, 0, 10, 8.5]], truths, sizes).acc_iou85 == 1.0  # IoU 0.85
    assert crop_scores([[0, 0, 10, 8.4]], truths, sizes).acc_iou85 == 0.0  # IoU 0.84
    normalized = crop_scores([[0, 0, 1, 0.85]], [np.array([[0, 0, 1, 1]])], [(1, 1)])
    assert normalized.acc_iou85 == 1.0  # 0.85 of float-rounded coordinates still counts


def test_crop_scores_equals_per_photo_mean() -> None:
    preds, truths, sizes = _three_photos()
    singles = [crop_scores([p], [t], [s]) for p, t, s in zip(preds, truths, sizes, strict=True)]
    scores = crop_scores(preds, truths, sizes)
    assert scores.iou == pytest.approx(np.mean([s.iou for s in singles]))
    assert scores.disp == pytest.approx(np.mean([s.disp for s in singles]))


def test_crop_scores_errors() -> None:
    with pytest.raises(ValueError, match="at least one photo"):
        crop_scores([], [], [])
    with pytest.raises(ValueError, match="one entry per photo"):
        crop_scores([FULL, FULL], [np.array([FULL])], [(10, 10)])
    with pytest.raises(ValueError, match="photo 0 has no ground-truth"):
        crop_scores([FULL], [np.zeros((0, 4))], [(10, 10)])


# --- GAICD Acc_K/N ---------------------------------------------------------------------------

# A 10 x 10 photo: six candidate crops; MOS ranks g0 > g1 > g2 = g3 > g4 > g5.
GRID = np.array(
    [
        FULL,  # g0
        [0, 0, 5, 5],  # g1
        [5, 0, 10, 5],  # g2
        [0, 5, 5, 10],  # g3
        [5, 5, 10, 10],  # g4
        [0, 0, 10, 5],  # g5
    ],
    dtype=float,
)
MOS = np.array([5.0, 4.0, 3.0, 3.0, 2.0, 1.0])
PREDS = np.array(
    [
        [5, 0, 10, 5],  # = g2 (IoU 1): 2 crops score higher -> a hit when N >= 3
        [0, 0, 10, 9],  # best g0 (IoU 90 / 100): top score -> a hit for every N
        [0, 0, 4, 4],  # best g1 at IoU 16 / 25 < 0.85 -> always a miss
        [5, 5, 10, 10],  # = g4: 4 crops score higher -> a hit when N >= 5
    ],
    dtype=float,
)


def _acc(preds: np.ndarray, k: int, n: int, **kwargs: float) -> float:
    return acc_k_n([preds], [GRID], [MOS], k, n, **kwargs)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (1, 1, 0.0),  # g2 is not the top crop
        (1, 3, 1.0),
        (2, 1, 1 / 2),  # only the match of g0
        (2, 3, 2 / 2),
        (3, 3, 2 / 3),  # the third prediction matches nothing
        (4, 4, 2 / 4),  # the 4th largest MOS is 3.0: g4 (MOS 2.0) is out
        (4, 5, 3 / 4),  # the 5th largest MOS is 2.0: g4 is in
    ],
)
def test_acc_k_n_by_hand(k: int, n: int, expected: float) -> None:
    assert _acc(PREDS, k, n) == pytest.approx(expected)


def test_acc_k_n_ties_are_in_the_top_n() -> None:
    # g3 ties g2 (MOS 3.0) for the 3rd largest MOS: both are in the top 3, neither in the top 2.
    g3 = GRID[3:4]
    assert _acc(g3, 1, 3) == 1.0
    assert _acc(g3, 1, 2) == 0.0


def test_acc_k_n_match_threshold_boundary() -> None:
    assert _acc(np.array([[0, 0, 10, 8.5]]), 1, 1) == 1.0  # IoU with g0 exactly 0.85
    assert _acc(np.array([[0, 0, 10, 8.4]]), 1, 1) == 0.0  # IoU 0.84
    assert _acc(np.array([[0, 0, 4, 4]]), 1, 2, match_iou=0.6) == 1.0  # 16 / 25 >= 0.6


def test_acc_k_n_matches_only_the_best_iou_crop() -> None:
    # Both grid crops are >= 0.85 IoU, but the match is the best one (IoU 0.96), of low MOS.
    grid, mos = np.array([FULL, [0, 0, 10, 9]]), np.array([1.0, 9.0])
    pred = np.array([[0, 0, 10, 9.6]])  # IoU 96 / 100 with FULL, 90 / 96 with the other
    assert acc_k_n([pred], [grid], [mos], 1, 1) == 0.0
    assert acc_k_n([pred], [grid], [mos], 1, 2) == 1.0


def test_acc_k_n_k_larger_than_predictions_counts_misses() -> None:
    assert _acc(PREDS, 5, 10) == pytest.approx(3 / 5)  # 3 hits, the 5th prediction is missing
    assert _acc(np.zeros((0, 4)), 2, 5) == 0.0


def test_acc_k_n_n_larger_than_grid_takes_every_crop() -> None:
    assert _acc(PREDS[[3]], 1, 10) == 1.0  # g4 is 5th of 6 crops


def test_acc_k_n_averages_photos() -> None:
    # Acc2/5: photo 1 (g2, g0) = 1; photo 2 (no predictions) = 0; photo 3 (miss, g4) = 1/2.
    preds = [PREDS[:2], np.zeros((0, 4)), PREDS[2:]]
    value = acc_k_n(preds, [GRID] * 3, [MOS] * 3, 2, 5)
    assert value == pytest.approx((1 + 0 + 1 / 2) / 3)


def test_acc_k_n_grows_with_n() -> None:
    values = [_acc(PREDS, 4, n) for n in range(1, 8)]
    assert values == sorted(values)


def test_gaicd_acc_table_by_hand() -> None:
    # 6 crops: N = 5 and N = 10 both keep g0..g4, so the hits are predictions 0, 1 and 3.
    table = gaicd_acc_table([PREDS], [GRID], [MOS])
    row = {"1": 1.0, "2": 1.0, "3": 2 / 3, "4": 3 / 4}
    expected = {f"Acc{k}/{n}": v for n in (5, 10) for k, v in row.items()}
    expected |= {"Acc_5": 41 / 48, "Acc_10": 41 / 48}
    assert table == pytest.approx(expected)
    assert list(table) == [f"Acc{k}/5" for k in "1234"] + ["Acc_5"] + [
        f"Acc{k}/10" for k in "1234"
    ] + ["Acc_10"]


def test_gaicd_acc_table_agrees_with_acc_k_n() -> None:
    rng = np.random.default_rng(0)
    grids = [GRID, GRID[:5], GRID]
    preds = [GRID[rng.permutation(6)[:4]], GRID[[4, 3]], np.zeros((0, 4))]
    mos = [rng.normal(size=6), rng.normal(size=5), MOS]
    table = gaicd_acc_table(preds, grids, mos)
    for k in (1, 2, 3, 4):
        for n in (5, 10):
            assert table[f"Acc{k}/{n}"] == acc_k_n(preds, grids, mos, k, n)
    for n in (5, 10):
        assert table[f"Acc_{n}"] == pytest.approx(np.mean([table[f"Acc{k}/{n}"] for k in "1234"]))


def test_acc_k_n_errors() -> None:
    with pytest.raises(ValueError, match="at least one photo"):
        acc_k_n([], [], [], 1, 5)
    with pytest.raises(ValueError, match="one entry per photo"):
        acc_k_n([PREDS], [GRID, GRID], [MOS], 1, 5)
    with pytest.raises(ValueError, match="photo 0: need >= 1 grid crop"):
        acc_k_n([PREDS], [np.zeros((0, 4))], [np.zeros(0)], 1, 5)
    with pytest.raises(ValueError, match="got 6 crops and 5 scores"):
        acc_k_n([PREDS], [GRID], [MOS[:5]], 1, 5)
    with pytest.raises(ValueError, match="K=0"):
        acc_k_n([PREDS], [GRID], [MOS], 0, 5)
    with pytest.raises(ValueError, match="at least one photo"):
        gaicd_acc_table([], [], [])
