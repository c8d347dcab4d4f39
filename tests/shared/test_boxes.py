"""Box conversions and geometry: round trips, hand-computed IoU / GIoU, numpy == torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from shared.boxes import (
    box_area,
    box_iou,
    clip_xyxy,
    cxcywh_to_xyxy,
    denormalize_xyxy,
    flip_xyxy,
    generalized_box_iou,
    median_box,
    normalize_xyxy,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
)


def _random_xyxy(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Valid xyxy boxes (x1 < x2, y1 < y2) in [0, 1], of shape (*shape, 4)."""
    corners = rng.uniform(0, 1, size=(*shape, 2, 2))  # (..., point, xy)
    low, high = corners.min(axis=-2), corners.max(axis=-2)
    return np.concatenate([low, high + 1e-3], axis=-1)


def test_cxcywh_xyxy_round_trip_keeps_batch_dims() -> None:
    boxes = _random_xyxy(np.random.default_rng(0), (2, 3))
    cxcywh = xyxy_to_cxcywh(boxes)
    assert cxcywh.shape == (2, 3, 4)
    np.testing.assert_allclose(cxcywh_to_xyxy(cxcywh), boxes, atol=1e-12)
    np.testing.assert_allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(cxcywh)), cxcywh, atol=1e-12)


def test_conversions_by_hand() -> None:
    np.testing.assert_array_equal(cxcywh_to_xyxy(np.array([5.0, 4.0, 4.0, 2.0])), [3, 3, 7, 5])
    np.testing.assert_array_equal(xyxy_to_cxcywh(np.array([3.0, 3.0, 7.0, 5.0])), [5, 4, 4, 2])
    np.testing.assert_array_equal(xywh_to_xyxy(np.array([[10, 20, 30, 40]])), [[10, 20, 40, 60]])


def test_normalize_denormalize_round_trip() -> None:
    pixels = np.array([[0.0, 0.0, 640.0, 480.0], [64.0, 48.0, 320.0, 240.0]])
    norm = normalize_xyxy(pixels, 640, 480)
    np.testing.assert_allclose(norm, [[0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]])
    np.testing.assert_allclose(denormalize_xyxy(norm, 640, 480), pixels)


def test_normalize_integer_pixels_gives_floats() -> None:
    norm = normalize_xyxy(np.array([0, 0, 3, 4]), 6, 8)
    assert np.issubdtype(norm.dtype, np.floating)
    np.testing.assert_allclose(norm, [0, 0, 0.5, 0.5])


def test_clip_into_image_and_idempotent() -> None:
    boxes = np.array([[-5.0, -1.0, 120.0, 50.0], [10.0, 10.0, 20.0, 20.0]])
    clipped = clip_xyxy(boxes, 100, 40)
    np.testing.assert_array_equal(clipped, [[0, 0, 100, 40], [10, 10, 20, 20]])
    np.testing.assert_array_equal(clip_xyxy(clipped, 100, 40), clipped)


def test_box_area_by_hand() -> None:
    boxes = np.array([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 1.0, 3.0]])
    np.testing.assert_array_equal(box_area(boxes), [6, 0, -1])  # inverted box: area <= 0


def test_iou_and_giou_by_hand() -> None:
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array(
        [
            [0.0, 0.0, 2.0, 2.0],  # identical
            [1.0, 0.0, 3.0, 2.0],  # half overlap: inter 2, union 6, enclosing 6
            [1.0, 1.0, 3.0, 3.0],  # corner: inter 1, union 7, enclosing 9
            [3.0, 0.0, 4.0, 2.0],  # disjoint: union 6, enclosing 8
        ]
    )
    np.testing.assert_allclose(box_iou(a, b), [[1, 1 / 3, 1 / 7, 0]])
    giou = [1, 1 / 3, 1 / 7 - 2 / 9, 0 - 2 / 8]
    np.testing.assert_allclose(generalized_box_iou(a, b), [giou])


def test_disjoint_boxes_have_zero_iou_and_negative_giou() -> None:
    a = np.array([[0.0, 0.0, 1.0, 1.0]])
    far = np.array([[2.0, 0.0, 3.0, 1.0], [10.0, 10.0, 11.0, 11.0]])
    np.testing.assert_array_equal(box_iou(a, far), [[0, 0]])
    giou = generalized_box_iou(a, far)
    assert (giou < 0).all() and (giou >= -1).all()
    assert giou[0, 1] < giou[0, 0]  # farther apart -> lower GIoU


def test_iou_symmetric_bounded_and_batched_equals_single() -> None:
    rng = np.random.default_rng(1)
    a, b = _random_xyxy(rng, (5,)), _random_xyxy(rng, (7,))
    for fn, low in ((box_iou, 0.0), (generalized_box_iou, -1.0)):
        pairwise = fn(a, b)
        assert pairwise.shape == (5, 7)
        np.testing.assert_allclose(fn(b, a), pairwise.T)
        assert (pairwise >= low - 1e-12).all() and (pairwise <= 1 + 1e-12).all()
        np.testing.assert_allclose(np.diag(fn(a, a)), np.ones(5))
        single = [[fn(a[i : i + 1], b[j : j + 1])[0, 0] for j in range(7)] for i in range(5)]
        np.testing.assert_allclose(pairwise, single)
    assert (generalized_box_iou(a, b) <= box_iou(a, b) + 1e-12).all()


UNARY: list[tuple[str, Callable[[Any], Any]]] = [
    ("cxcywh_to_xyxy", cxcywh_to_xyxy),
    ("xyxy_to_cxcywh", xyxy_to_cxcywh),
    ("xywh_to_xyxy", xywh_to_xyxy),
    ("normalize_xyxy", lambda x: normalize_xyxy(x, 640, 480)),
    ("denormalize_xyxy", lambda x: denormalize_xyxy(x, 640, 480)),
    ("clip_xyxy", lambda x: clip_xyxy(x, 0.5, 0.7)),
    ("box_area", box_area),
]
PAIRWISE = [("box_iou", box_iou), ("generalized_box_iou", generalized_box_iou)]


@pytest.mark.parametrize(("name", "fn"), UNARY, ids=[n for n, _ in UNARY])
def test_torch_matches_numpy_unary(name: str, fn: Callable[[Any], Any]) -> None:
    torch = pytest.importorskip("torch")
    boxes = _random_xyxy(np.random.default_rng(2), (3, 4)).astype(np.float32)
    expected = fn(boxes)
    got = fn(torch.from_numpy(boxes))
    assert isinstance(got, torch.Tensor), name
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "fn"), PAIRWISE, ids=[n for n, _ in PAIRWISE])
def test_torch_matches_numpy_pairwise(name: str, fn: Callable[[Any, Any], Any]) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    a, b = _random_xyxy(rng, (4,)), _random_xyxy(rng, (6,))
    got = fn(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(got, torch.Tensor), name
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got.numpy(), fn(a, b), rtol=1e-12)


def test_torch_gradients_flow_through_giou() -> None:
    torch = pytest.importorskip("torch")
    pred = torch.tensor([[0.1, 0.1, 0.6, 0.6]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0.2, 0.2, 0.7, 0.7]], dtype=torch.float64)
    (1 - generalized_box_iou(pred, target)).sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert (pred.grad[0, :2] < 0).all()  # moving x1, y1 toward the target lowers the loss


def test_flip_xyxy_by_hand_and_twice_is_identity() -> None:
    boxes = np.array([[0.1, 0.2, 0.4, 0.9], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(flip_xyxy(boxes), [[0.6, 0.2, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]])
    crops = _random_xyxy(np.random.default_rng(1), (20,))
    np.testing.assert_allclose(flip_xyxy(flip_xyxy(crops)), crops, atol=1e-12)
    assert (flip_xyxy(crops)[:, 2] > flip_xyxy(crops)[:, 0]).all()


def test_median_box_per_coordinate_and_empty() -> None:
    boxes = np.array([[0.0, 0.1, 0.5, 0.9], [0.2, 0.0, 0.9, 0.8], [0.1, 0.3, 0.6, 1.0]])
    np.testing.assert_allclose(median_box(boxes), [0.1, 0.1, 0.6, 0.9])
    assert median_box(np.zeros((0, 4))) is None
