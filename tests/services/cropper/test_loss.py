"""Hungarian matching and the set loss, on hand-made proposals and ground truths."""

from __future__ import annotations

import math

import pytest
import torch

from services.cropper.config import LossConfig
from services.cropper.loss import SetCriterion, sigmoid_focal_loss
from services.cropper.matcher import HungarianMatcher

# Normalized cxcywh boxes. GT is (0.3, 0.25, 0.7, 0.75) in xyxy, area 0.2; the others share its
# centre and height, so their IoU with it is their width ratio.
GT = torch.tensor([0.5, 0.5, 0.4, 0.5])
IOU_90 = torch.tensor([0.5, 0.5, 0.36, 0.5])
IOU_86 = torch.tensor([0.5, 0.5, 0.344, 0.5])
IOU_84 = torch.tensor([0.5, 0.5, 0.336, 0.5])
FAR = torch.tensor([0.15, 0.15, 0.2, 0.2])  # no overlap with GT


def outputs(boxes: torch.Tensor, logits: torch.Tensor | None = None, aux: int = 0) -> dict:
    """A model output for (B, Q, 4) boxes; `aux` earlier layers that repeat the last one."""
    logits = torch.zeros(boxes.shape[:2]) if logits is None else logits
    layer = {"logits": logits, "boxes": boxes}
    return {**layer, "aux": [dict(layer) for _ in range(aux)]}


# --- HungarianMatcher -------------------------------------------------------------------------


def test_matcher_finds_the_obvious_assignment() -> None:
    a, b = torch.tensor([0.3, 0.3, 0.2, 0.2]), torch.tensor([0.7, 0.6, 0.3, 0.4])
    boxes = torch.stack([b, FAR, a])[None]  # (1, 3, 4)
    targets = [torch.stack([a, b])]
    rows, cols = HungarianMatcher()(torch.zeros(1, 3), boxes, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 2: 0}
    assert rows.dtype == cols.dtype == torch.int64


def test_matcher_prefers_the_confident_proposal_between_equal_boxes() -> None:
    boxes = torch.stack([GT, GT])[None]
    logits = torch.tensor([[-3.0, 3.0]])
    rows, cols = HungarianMatcher()(logits, boxes, [GT[None]])[0]
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_matcher_with_more_ground_truths_than_queries() -> None:
    a, b, c = GT, torch.tensor([0.2, 0.8, 0.2, 0.2]), torch.tensor([0.8, 0.2, 0.2, 0.2])
    boxes = torch.stack([c, a])[None]  # Q = 2
    rows, cols = HungarianMatcher()(torch.zeros(1, 2), boxes, [torch.stack([a, b, c])])[0]
    assert len(rows) == len(cols) == 2  # min(Q, G)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 2, 1: 0}


def test_matcher_with_empty_targets() -> None:
    boxes = torch.stack([GT, FAR])[None].expand(2, -1, -1)
    matches = HungarianMatcher()(torch.zeros(2, 2), boxes, [torch.zeros(0, 4), GT[None]])
    rows, cols = matches[0]
    assert rows.shape == cols.shape == (0,) and rows.dtype == torch.int64
    assert matches[1][0].tolist() == [0] and matches[1][1].tolist() == [0]


def test_matcher_batched_equals_one_by_one() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 6, 4, generator=g) * 0.4 + 0.3
    logits = torch.randn(3, 6, generator=g)
    targets = [torch.rand(n, 4, generator=g) * 0.4 + 0.3 for n in (2, 0, 4)]
    matcher = HungarianMatcher()
    batched = matcher(logits, boxes, targets)
    for b in range(3):
        (rows, cols), (rows_b, cols_b) = (
            matcher(logits[b : b + 1], boxes[b : b + 1], targets[b : b + 1])[0],
            batched[b],
        )
        assert rows.tolist() == rows_b.tolist() and cols.tolist() == cols_b.tolist()


# --- sigmoid_focal_loss -----------------------------------------------------------------------


def focal_by_hand(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * abs(target - p) ** gamma * ce


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([0.0, 0.0, math.log(3), -2.0, 1.5])  # p = 0.5, 0.5, 0.75, ...
    targets = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.9])
    loss = sigmoid_focal_loss(logits, targets)
    # Two by hand in full: p = 0.5 gives (1/2)^2 ln 2 times alpha (target 1) or 1 - alpha (target 0).
    assert loss[0].item() == pytest.approx(0.25 * 0.25 * math.log(2))
    assert loss[1].item() == pytest.approx(0.75 * 0.25 * math.log(2))
    # Soft target 0.5 at p = 0.75: alpha_t = 0.5, |0.5 - 0.75|^2 = 1/16, CE = -(ln 0.75 + ln 0.25) / 2.
    assert loss[2].item() == pytest.approx(0.5 / 16 * -(math.log(0.75) + math.log(0.25)) / 2)
    expected = [focal_by_hand(x, t) for x, t in zip(logits.tolist(), targets.tolist(), strict=True)]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_vanishes_when_the_score_equals_a_soft_target() -> None:
    logits = torch.tensor([math.log(3), 0.0, -math.log(4)])
    assert sigmoid_focal_loss(logits, logits.sigmoid()).abs().max() < 1e-7


# --- SetCriterion -----------------------------------------------------------------------------


def test_perfect_prediction_has_no_box_loss() -> None:
    targets = [torch.stack([GT, torch.tensor([0.7, 0.6, 0.3, 0.4])]), GT[None]]
    boxes = torch.stack(
        [torch.stack([FAR, targets[0][1], targets[0][0]]), torch.stack([GT, FAR, FAR])]
    )  # (2, 3, 4)
    logits = torch.tensor([[-12.0, 12.0, 12.0], [12.0, -12.0, -12.0]])
    losses = SetCriterion(LossConfig(aux_loss=False))(outputs(boxes, logits), targets)
    assert losses["l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["score"].item() == pytest.approx(0.0, abs=1e-6)


def test_box_losses_by_hand() -> None:
    # Shifted right by 0.1: xyxy (0.4, 0.25, 0.8, 0.75). Intersection 0.3 x 0.5 = 0.15, union
    # 0.25, IoU 0.6; the enclosing box 0.5 x 0.5 equals the union, so GIoU = IoU.
    shifted = GT + torch.tensor([0.1, 0.0, 0.0, 0.0])
    losses = SetCriterion(LossConfig(aux_loss=False))(outputs(shifted[None, None]), [GT[None]])
    assert losses["l1"].item() == pytest.approx(0.1)
    assert losses["giou"].item() == pytest.approx(1 - 0.6)


def score_targets(boxes: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor) -> list[float]:
    criterion = SetCriterion(LossConfig())
    logits = torch.zeros(1, len(boxes))
    matches = criterion.matcher(logits, boxes[None], [truth])
    return criterion._score_targets(boxes[None], [truth], [weights], matches)[0].tolist()


def test_unmatched_proposals_near_a_crop_get_its_iou_as_target() -> None:
    boxes = torch.stack([GT, IOU_90, IOU_86, IOU_84, FAR])
    targets = score_targets(boxes, GT[None], torch.ones(1))
    assert targets == pytest.approx([1.0, 0.9, 0.86, 0.0, 0.0], abs=1e-5)


def test_soft_targets_scale_with_the_crop_weight() -> None:
    boxes = torch.stack([GT, IOU_90, FAR])
    targets = score_targets(boxes, GT[None], torch.tensor([0.5]))
    assert targets == pytest.approx([0.5, 0.45, 0.0], abs=1e-5)


def test_soft_target_threshold_is_configurable() -> None:
    boxes = torch.stack([GT, IOU_84])[None]
    criterion = SetCriterion(LossConfig(soft_iou=0.8))
    matches = criterion.matcher(torch.zeros(1, 2), boxes, [GT[None]])
    targets = criterion._score_targets(boxes, [GT[None]], [torch.ones(1)], matches)
    assert targets[0].tolist() == pytest.approx([1.0, 0.84], abs=1e-5)


def test_aux_losses_follow_the_switch() -> None:
    boxes = torch.stack([IOU_90, FAR])[None]
    out = outputs(boxes, aux=2)
    with_aux = SetCriterion(LossConfig(aux_loss=True))(out, [GT[None]])
    without = SetCriterion(LossConfig(aux_loss=False))(out, [GT[None]])
    names = {"score", "l1", "giou"}
    assert set(without) == names | {"loss"}
    assert set(with_aux) == names | {f"{n}_{i}" for n in names for i in (1, 2)} | {"loss"}
    # Every aux layer repeats the last one here, so the total is three times as large.
    assert with_aux["loss"].item() == pytest.approx(3 * without["loss"].item())
    c = LossConfig()
    weighted = c.weight_score * without["score"] + c.weight_l1 * without["l1"]
    weighted = weighted + c.weight_giou * without["giou"]
    assert without["loss"].item() == pytest.approx(weighted.item())


def test_empty_targets_give_only_a_score_loss() -> None:
    boxes = torch.stack([GT, FAR])[None].expand(2, -1, -1)
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    losses = SetCriterion(LossConfig())(outputs(boxes, logits), [torch.zeros(0, 4)] * 2)
    assert losses["l1"].item() == 0.0 and losses["giou"].item() == 0.0
    # Normalized by max(#ground truths, 1) = 1: the focal loss of every proposal against 0.
    expected = sigmoid_focal_loss(logits.detach(), torch.zeros(2, 2)).sum()
    assert losses["score"].item() == pytest.approx(expected.item())
    losses["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_loss_is_normalized_by_the_number_of_crops() -> None:
    boxes = torch.stack([IOU_90, FAR])[None]
    criterion = SetCriterion(LossConfig(aux_loss=False))
    one = criterion(outputs(boxes), [GT[None]])
    # The same photo twice: twice the sums, twice the crops, the same losses.
    two = criterion(outputs(boxes.expand(2, -1, -1)), [GT[None], GT[None]])
    for name in ("score", "l1", "giou", "loss"):
        assert two[name].item() == pytest.approx(one[name].item(), rel=1e-6)
