"""Crop metrics: IoU and boundary displacement against the best-IoU ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from shared.metrics import best_iou_and_disp


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
