"""Pseudo-label curation for weak supervision on CAD (the paper's stage 2), and round statistics.

Each round, the current model's ranked proposals for a CAD canvas become its labels for the next
epochs. `curate` keeps, in order of the model's score, the proposals that

1. have an aspect ratio near one of 1, 5/4, 4/3, 7/5, 3/2, 16/9 or their inverses: within
   `ratio_tolerance` in log(width / height), 0.05 by default (about 5%; 4/3 and 7/5 are 0.05 apart,
   so the bands of neighbouring ratios touch but the gaps 1.05-1.19 and 1.87-up stay out);
2. overlap the canvas's original region (the placed professional photo) by IoU > `min_region_iou`
   (0.8, the paper's);
3. are diverse (the rule): visited by decreasing score, a proposal is kept only if its IoU with
   every label kept so far is below `max_pairwise_iou` (0.9). Two boxes of IoU >= 0.9 differ by
   less than about 5% of their side in size and position together, so every kept pair differs
   in size or position by more than that;

and stop at `k` (up to 8). Boxes are pixel xyxy in the canvas throughout this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.cropper.postprocess import CropRequest
from shared.boxes import box_iou

TARGET_RATIOS = {"1:1": 1.0, "5:4": 5 / 4, "4:3": 4 / 3, "7:5": 7 / 5, "3:2": 3 / 2, "16:9": 16 / 9}
MAX_K = 8


def round_request(proposals: int) -> CropRequest:
    """What a pseudo-label round asks of the model: up to `proposals` crops per canvas, its raw
    ones (the best not fused with the neighbours' median crop: `transfer`), so the labels are the
    model's own, as in the README's round statistics."""
    return CropRequest(proposals, transfer=False)


@dataclass(frozen=True)
class CurationConfig:
    """How a canvas's proposals become its pseudo-labels (see the module docstring)."""

    k: int = 8  # pseudo-labels kept per canvas (the paper: up to 8)
    ratio_tolerance: float = 0.05  # |log(w / h) - log(r)| allowed for a target ratio r (or 1/r)
    min_region_iou: float = 0.8  # IoU with the original region must be above this
    max_pairwise_iou: float = 0.9  # a kept label's IoU with every other kept one is below this

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be 1 to {MAX_K}, got {self.k}")
        if not 0 < self.ratio_tolerance < 1:
            raise ValueError(f"ratio_tolerance must be in (0, 1), got {self.ratio_tolerance}")
        for name in ("min_region_iou", "max_pairwise_iou"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def nearest_ratio(boxes: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(N, 4) pixel xyxy -> the nearest target ratio of each ("3:4" for portrait 4:3) and its
    distance (N,) in log(width / height)."""
    names = [*TARGET_RATIOS, *(_portrait(n) for n in TARGET_RATIOS if n != "1:1")]
    logs = np.log([*TARGET_RATIOS.values(), *(1 / r for r in TARGET_RATIOS.values() if r != 1)])
    aspect = np.log(np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)) - np.log(
        np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    )
    gaps = np.abs(aspect[:, None] - logs[None])  # (N, 11)
    best = gaps.argmin(1)
    return [names[i] for i in best], gaps[np.arange(len(boxes)), best]


def curate(
    boxes: np.ndarray, scores: np.ndarray, region: Sequence[float], config: CurationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Proposals (Q, 4) pixel xyxy with scores (Q,) -> pseudo-labels (M, 4) and their scores
    (M,), best first, M <= k; `region` is the canvas's original region, pixel xyxy."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if not len(boxes):
        return boxes, scores
    _, ratio_gap = nearest_ratio(boxes)
    region_iou = box_iou(boxes, np.asarray(region, np.float64)[None])[:, 0]
    eligible = (ratio_gap <= config.ratio_tolerance) & (region_iou > config.min_region_iou)
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if not eligible[i]:
            continue
        if kept and box_iou(boxes[i : i + 1], boxes[kept]).max() >= config.max_pairwise_iou:
            continue
        kept.append(int(i))
        if len(kept) == config.k:
            break
    return boxes[kept], scores[kept]


def round_stats(labels: Sequence[np.ndarray], regions: Sequence[Sequence[float]]) -> dict:
    """What a round's pseudo-labels look like: per canvas labels (M_i, 4) pixel xyxy and its
    original region. Means are over canvases (pairwise IoU: over canvases with >= 2 labels)."""
    counts, pairwise, spread, region_iou = [], [], [], []
    ratios: Counter[str] = Counter()
    for boxes, region in zip(labels, regions, strict=True):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        counts.append(len(boxes))
        if not len(boxes):
            continue
        region_iou.append(float(box_iou(boxes, np.asarray(region, np.float64)[None]).mean()))
        names, _ = nearest_ratio(boxes)
        ratios.update(names)
        aspect = np.log((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1]))
        spread.append(float(aspect.std()))
        if len(boxes) >= 2:
            m = box_iou(boxes, boxes)
            pairwise.append(float(m[np.triu_indices(len(boxes), 1)].mean()))
    return {
        "images": len(counts),
        "mean_labels": _mean(counts),
        "mean_pairwise_iou": _mean(pairwise),
        "aspect_log_std": _mean(spread),  # spread of log(w / h) within a canvas's labels
        "distinct_ratios": len(ratios),
        "ratios": dict(ratios.most_common()),
        "mean_region_iou": _mean(region_iou),
    }


def _portrait(name: str) -> str:
    w, h = name.split(":")
    return f"{h}:{w}"


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None
