"""Pseudo-label curation: each rule on planted violations, and the round statistics."""

from __future__ import annotations

import numpy as np
import pytest

from services.cropper.pseudo_labels import CurationConfig, curate, nearest_ratio, round_stats

REGION = (100.0, 100.0, 500.0, 400.0)  # 400 x 300: 4:3


def _box(cx: float, cy: float, w: float, h: float) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_every_rule_drops_its_planted_violation() -> None:
    boxes = np.array([
        _box(300, 250, 400, 300),  # the region itself: kept (4:3)
        _box(300, 250, 396, 297),  # a near copy of it (IoU 0.98): not diverse
        _box(300, 250, 380, 250),  # 1.52 : 1 ~ 3:2, IoU 0.79 with the region: too far off
        _box(300, 250, 340, 300),  # 1.133 : 1, between 1:1 and 5:4 bands: no target ratio
        _box(310, 250, 400, 300),  # shifted by 10 px: IoU 0.95 with the kept region: not diverse
        _box(300, 250, 390, 260),  # 3:2, IoU 0.845 with the region: kept
        _box(300, 250, 300, 400),  # 3:4 portrait, IoU 0.6: too far off
    ])  # fmt: skip
    scores = np.linspace(0.9, 0.3, len(boxes))
    kept, kept_scores = curate(boxes, scores, REGION, CurationConfig())
    np.testing.assert_allclose(kept, boxes[[0, 5]])
    np.testing.assert_allclose(kept_scores, scores[[0, 5]])


def test_labels_rank_by_score_and_stop_at_k() -> None:
    rng = np.random.default_rng(0)
    boxes = np.array([_box(300 + d, 250, 400, 300) for d in range(0, 200, 12)], np.float64)
    scores = rng.random(len(boxes))
    loose = CurationConfig(k=3, min_region_iou=0.0, max_pairwise_iou=1.0)
    kept, kept_scores = curate(boxes, scores, REGION, loose)
    assert len(kept) == 3
    np.testing.assert_allclose(kept_scores, np.sort(scores)[::-1][:3])


def test_portrait_ratios_count() -> None:
    names, gaps = nearest_ratio(np.array([_box(0, 0, 300, 400), _box(0, 0, 90, 160)]))
    assert names == ["3:4", "9:16"] and gaps.max() < 1e-9


def test_no_proposals_give_no_labels() -> None:
    kept, scores = curate(np.zeros((0, 4)), np.zeros(0), REGION, CurationConfig())
    assert kept.shape == (0, 4) and scores.shape == (0,)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="k must be"):
        CurationConfig(k=9)


def test_round_stats() -> None:
    a = np.array([REGION, _box(300, 250, 390, 260)])
    stats = round_stats([a, np.zeros((0, 4)), a[:1]], [REGION, REGION, REGION])
    assert stats["images"] == 3 and stats["mean_labels"] == 1.0
    assert stats["mean_pairwise_iou"] == pytest.approx(0.845, abs=1e-3)
    assert stats["ratios"] == {"4:3": 2, "3:2": 1} and stats["distinct_ratios"] == 2
    assert stats["mean_region_iou"] == pytest.approx(((1 + 0.845) / 2 + 1) / 2, abs=1e-3)
    assert stats["aspect_log_std"] > 0
