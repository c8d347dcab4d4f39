"""Turn the cropper's raw proposals into what users get: diverse crops at a requested ratio.

    request = CropRequest.parse(n=5, aspect_ratios=["16:9"])   # checked once, at the edge
    result = select_crops(scores, boxes, width, height, request)

Pure numpy (no torch). Boxes are pixel (x1, y1, x2, y2) of a `width` x `height` photo, as at
every edge of the system (see `shared.boxes`); the pixel boxes may be float.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from shared.boxes import box_iou, denormalize_xyxy, xyxy_to_cxcywh
from shared.crop_request import AspectRatio, check_crop_request, parse_aspect_ratio, ratio_value

__all__ = [
    "AspectRatio",
    "parse_aspect_ratio",
    "ratio_value",
]  # re-exported: the cropper's callers use them

# Two crops with IoU above this are near duplicates, and only the better one is offered. Crops
# are large and overlap a lot: two crops of one size shifted by 8 % of a side still have IoU
# 0.92 / 1.08 ~ 0.85, and so do a crop and its centred 8 % zoom (0.92^2); the field (GAICD
# matching, FCDB / FLMS "acc") treats IoU >= 0.85 as the same crop. 0.7 was tried (5-fold CV,
# benchmarks/cv_crop_models.py): the top 3 then overlap at 0.64 instead of 0.76, but best-of-3 IoU
# falls by about 0.006 with the shipped model's fused top-1, so 0.85 stays.
NEAR_DUPLICATE_IOU = 0.85


def _check_boxes(boxes: np.ndarray, name: str) -> None:
    """Raise ValueError unless `boxes` is (N, 4) xyxy, finite, with x2 > x1 and y2 > y1."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4); got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{name} must be finite; got {boxes[~np.isfinite(boxes).all(1)]}")
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        raise ValueError(f"{name} must have x2 > x1 and y2 > y1; got {boxes[bad]}")


def suppress_near_duplicates(
    boxes_xyxy: ArrayLike,
    scores: ArrayLike,
    iou_threshold: float = NEAR_DUPLICATE_IOU,
    max_keep: int | None = None,
) -> np.ndarray:
    """Greedy non-maximum suppression: the indices of diverse crops, best score first.

    Visits crops by decreasing score (the earlier index first on equal scores) and keeps one
    unless its IoU with a kept crop is > `iou_threshold` (IoU equal to it is kept, as in
    torchvision's `nms`); stops after `max_keep` crops.

    Args:
        boxes_xyxy: (N, 4) crops, xyxy, with positive width and height; N may be 0.
        scores: (N,) finite scores, higher is better.
        iou_threshold: in (0, 1]; 1 suppresses nothing.
        max_keep: most indices returned (>= 1), or None for all survivors.
    Returns:
        (K,) int64 indices into `boxes_xyxy`, K <= min(N, max_keep), by decreasing score.
    """
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    score = np.asarray(scores, np.float64).reshape(-1)
    _check_boxes(boxes, "boxes_xyxy")
    if len(score) != len(boxes) or not np.isfinite(score).all():
        raise ValueError(f"scores must be {len(boxes)} finite numbers; got {score}")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1]; got {iou_threshold}")
    if max_keep is not None and max_keep < 1:
        raise ValueError(f"max_keep must be >= 1 or None; got {max_keep}")
    order = np.argsort(-score, kind="stable")
    ious = box_iou(boxes, boxes)  # (N, N); fine for the tens of proposals of one photo
    limit = len(boxes) if max_keep is None else max_keep
    keep: list[int] = []
    for i in order:
        if len(keep) == limit:
            break
        if not keep or ious[i, keep].max() <= iou_threshold:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


def cover_samples(
    boxes_xyxy: ArrayLike,
    scores: ArrayLike,
    samples_xyxy: ArrayLike,
    n: int,
    iou_threshold: float = NEAR_DUPLICATE_IOU,
) -> np.ndarray:
    """The indices of `n` crops that together come closest to plausible expert crops: the
    best-scored crop first, then, greedily, the crop that most raises the mean over the
    `samples` (e.g. the crops of the photo's nearest compositions) of the best IoU any kept crop
    has with each sample. A crop whose IoU with a kept crop is above `iou_threshold` is never
    kept, and ties go to the better score. Minimum Bayes risk for best-of-n IoU, with the
    samples as the posterior over the expert's crop.

    Args:
        boxes_xyxy: (N, 4) candidate crops, xyxy (any one scale; IoU ignores it).
        scores: (N,) finite scores; the best one is kept first.
        samples_xyxy: (S, 4) plausible crops in the same coordinates; S may be 0 (then this is
            `suppress_near_duplicates`).
        n: most indices returned, >= 1.
    Returns:
        (K,) int64 indices, K <= min(N, n), in the order kept.
    """
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    score = np.asarray(scores, np.float64).reshape(-1)
    samples = np.asarray(samples_xyxy, np.float64).reshape(-1, 4)
    if len(samples) == 0 or len(boxes) == 0:
        return suppress_near_duplicates(boxes, score, iou_threshold, max_keep=n)
    _check_boxes(samples, "samples_xyxy")
    first = suppress_near_duplicates(boxes, score, iou_threshold, max_keep=1)
    ious, reach = box_iou(boxes, boxes), box_iou(boxes, samples)  # (N, N), (N, S)
    keep = [int(first[0])]
    covered = reach[keep[0]]
    while len(keep) < n:
        allowed = ious[:, keep].max(1) <= iou_threshold
        allowed[keep] = False  # a kept crop overlaps itself at IoU 1, allowed at threshold 1
        if not allowed.any():
            break
        gain = np.maximum(reach, covered).mean(1)
        # the best gain, then the best score: lexicographic over the allowed candidates
        order = np.lexsort((-score, -gain))
        best = int(order[allowed[order]][0])
        keep.append(best)
        covered = np.maximum(covered, reach[best])
    return np.asarray(keep, np.int64)


def fit_aspect_ratio(
    box_xyxy: ArrayLike,
    ratio: AspectRatio | tuple[float, float],
    width: float,
    height: float,
) -> np.ndarray:
    """The crop of aspect ratio `ratio` nearest to `box_xyxy`, inside the photo.

    1. Keep the centre and the area: new_w = sqrt(area * r), new_h = sqrt(area / r).
    2. Shrink both sides by one factor until new_w <= width and new_h <= height.
    3. Shift the box, as little as possible, into [0, width] x [0, height].
    A ratio more extreme than the photo's gives a crop of full width (or full height).

    Args:
        box_xyxy: (4,) pixel xyxy crop with positive width and height.
        ratio: r = crop width / crop height in pixels, as a float or as (W, H).
        width, height: photo size in pixels, > 0.
    Returns:
        (4,) float64 xyxy with 0 <= x1 < x2 <= width, 0 <= y1 < y2 <= height, and
        (x2 - x1) / (y2 - y1) == r up to float rounding (relative error ~1e-15). Round to
        integer pixels with `round_to_pixels`.
    """
    box = np.asarray(box_xyxy, np.float64).reshape(1, 4)
    _check_boxes(box, "box_xyxy")
    r = ratio_value(ratio)
    if not (width > 0 and height > 0):
        raise ValueError(f"photo size must be positive; got {width} x {height}")
    cx, cy, w, h = xyxy_to_cxcywh(box[0])
    new_h = min(math.sqrt(w * h / r), height, width / r)  # steps 1 and 2 at once
    new_w = min(new_h * r, width)  # min: new_h * r may round above width
    return _place(cx, cy, new_w, new_h, width, height)


def _place(cx: float, cy: float, w: float, h: float, width: float, height: float) -> np.ndarray:
    """A w x h box centred at (cx, cy), shifted the least into the photo: (4,) xyxy float64.

    Needs w <= width and h <= height; edges are clamped so that rounding never leaves the photo.
    """
    x1 = min(max(cx - w / 2, 0.0), width - w)
    y1 = min(max(cy - h / 2, 0.0), height - h)
    return np.array([x1, y1, min(x1 + w, width), min(y1 + h, height)])


def round_to_pixels(
    box_xyxy: ArrayLike, ratio: AspectRatio | tuple[float, float], width: int, height: int
) -> np.ndarray:
    """Integer-pixel crop near a float crop of ratio `ratio`, keeping the ratio closest.

    Tries the two integer heights around the box's height, each with the nearest integer
    width for `ratio`, and keeps the pair of least ratio error (|w / h - r| <= 0.5 / h when the
    width fits the photo); then centres it where the box was, inside the photo.

    Args:
        box_xyxy: (4,) pixel xyxy crop inside the photo, e.g. from `fit_aspect_ratio`.
        ratio: r = width / height, as a float or as (W, H).
        width, height: photo size in whole pixels, >= 1.
    Returns:
        (4,) int64 xyxy with 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height.
    """
    box = np.asarray(box_xyxy, np.float64).reshape(1, 4)
    _check_boxes(box, "box_xyxy")
    r = ratio_value(ratio)
    cx, cy, _, h = xyxy_to_cxcywh(box[0])
    candidates = []
    for h_int in {min(max(math.floor(h), 1), height), min(max(math.ceil(h), 1), height)}:
        w_int = min(max(round(h_int * r), 1), width)
        candidates.append((abs(w_int / h_int - r), -h_int, w_int, h_int))
    _, _, w_int, h_int = min(candidates)  # least ratio error, then the larger crop
    x1 = min(max(round(cx - w_int / 2), 0), width - w_int)
    y1 = min(max(round(cy - h_int / 2), 0), height - h_int)
    return np.array([x1, y1, x1 + w_int, y1 + h_int], np.int64)


@dataclass(frozen=True)
class CropRequest:
    """What a caller asks for: `n` crops per photo, or `n` per ratio with `ratios`."""

    n: int = 5
    ratios: tuple[tuple[str, AspectRatio], ...] = ()  # ("16:9", parsed ratio), ...
    # How the proposals become crops. Users get the defaults; weak training's pseudo-label rounds
    # ask for the model's raw proposals (`services.cropper.pseudo_labels.round_request`).
    nms_iou: float = NEAR_DUPLICATE_IOU  # crops overlapping a better one above this are dropped
    transfer: bool = True  # apply the model's `transfer_weight` to its top proposal

    @classmethod
    def parse(cls, n: int = 5, aspect_ratios: Sequence[str] = ()) -> CropRequest:
        """Check `n` and parse the "W:H" ratios; ValueError names what is wrong."""
        check_crop_request(n, aspect_ratios)
        return cls(n, tuple((t.replace(" ", ""), parse_aspect_ratio(t)) for t in aspect_ratios))


@dataclass(frozen=True)
class Crop:
    box: tuple[int, int, int, int]  # pixel xyxy in the original photo
    score: float  # aesthetic score in [0, 1] (a ratio crop: its proposal's times their IoU)
    aspect_ratio: str | None  # the requested "W:H" this crop has exactly, or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "score": round(self.score, 4),
            "aspect_ratio": self.aspect_ratio,
        }


@dataclass(frozen=True)
class CropResult:
    width: int
    height: int
    crops: list[Crop]  # best first

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "crops": [c.to_dict() for c in self.crops],
        }


def fuse_with_transfer(
    scores: np.ndarray, boxes_norm: np.ndarray, transfer: np.ndarray | None, weight: float
) -> np.ndarray:
    """The proposals (Q, 4), normalized xyxy, with the best-scored one moved toward `transfer`
    (the neighbours' median crop, normalized xyxy; None: no neighbour has a crop):
    `(1 - weight) * box + weight * transfer`. Two estimates of the same crop, one from the model
    and one from the compositions it retrieved: their mean is nearer the expert's crop than
    either (5-fold CV in the README). The other proposals, the alternatives, stay as they are."""
    if transfer is None or weight == 0.0 or len(boxes_norm) == 0:
        return boxes_norm
    fused = np.array(boxes_norm, dtype=np.float64)
    best = int(np.argmax(scores))
    fused[best] = (1.0 - weight) * fused[best] + weight * np.asarray(transfer, np.float64)
    return fused


def _pixel_boxes(boxes_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalized xyxy (N, 4) -> float pixel xyxy inside the photo, never empty."""
    boxes = denormalize_xyxy(np.asarray(boxes_norm, np.float64).reshape(-1, 4), width, height)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1e-3)  # never empty
    boxes[:, 2] = np.minimum(boxes[:, 2], width)
    boxes[:, 3] = np.minimum(boxes[:, 3], height)
    boxes[:, :2] = np.minimum(boxes[:, :2], boxes[:, 2:] - 1e-3)
    return boxes


def select_crops(
    scores: np.ndarray,
    boxes_norm: np.ndarray,
    width: int,
    height: int,
    request: CropRequest,
    samples_norm: np.ndarray | None = None,
) -> CropResult:
    """Ranked proposals, scores (Q,) and normalized xyxy (Q, 4) -> the crops users get (pixel
    xyxy inside the photo), near duplicates (IoU above `request.nms_iou`) suppressed. With
    `samples_norm` (S, 4), plausible expert crops (the nearest compositions' crops), the
    alternatives after the best are the proposals that best cover them (`cover_samples`)
    instead of the next best scored, in the order picked (so their scores need not fall).
    With ratios, each ratio gets `request.n` crops, interleaved: every ratio's first crop (the
    better scored first), then every ratio's second, and so on."""
    boxes = _pixel_boxes(boxes_norm, width, height)
    samples = None if samples_norm is None else _pixel_boxes(samples_norm, width, height)

    def pick(candidates: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        if samples is None:
            return suppress_near_duplicates(candidates, ranks, request.nms_iou, request.n)
        return cover_samples(candidates, ranks, samples, request.n, request.nms_iou)

    if not request.ratios:
        free = [_free_crop(boxes[i], scores[i], width, height) for i in pick(boxes, scores)]
        return CropResult(width, height, distinct_after_rounding(free, request.nms_iou))
    ranked: list[tuple[int, float, Crop]] = []
    for label, ratio in request.ratios:
        fitted = np.stack([fit_aspect_ratio(b, ratio, width, height) for b in boxes])
        # The least-adjusted proposals rank first: score times the IoU of the fitted with the raw.
        fitted_scores = scores * box_iou(fitted, boxes).diagonal()
        crops = [
            Crop(tuple(int(v) for v in round_to_pixels(fitted[i], ratio, width, height)),  # type: ignore[arg-type]
                 float(fitted_scores[i]), label)
            for i in pick(fitted, fitted_scores)
        ]  # fmt: skip
        for rank, crop in enumerate(distinct_after_rounding(crops, request.nms_iou)):
            ranked.append((rank, -crop.score, crop))
    # Every ratio's best crop first (by score), then every ratio's second, ...: each ratio's crops
    # keep the order they were picked in, so its first n are what a request for n would get.
    ranked.sort(key=lambda r: r[:2])
    return CropResult(width, height, [crop for _, _, crop in ranked])


def distinct_after_rounding(crops: Sequence[Crop], iou_threshold: float) -> list[Crop]:
    """`crops` (in their order) less any whose pixel box overlaps a kept one above
    `iou_threshold`: proposals kept apart as floats can round to the same pixels in a photo of a
    few pixels (a 2 x 2 photo gave three crops of 0 0 2 2). In photos of ordinary size rounding
    moves an edge by half a pixel at most, so only a pair within a hair of the threshold could
    change."""
    if not crops:
        return []
    boxes = np.asarray([c.box for c in crops], np.float64)
    order = -np.arange(len(crops), dtype=np.float64)  # as scores: the given order
    return [crops[i] for i in suppress_near_duplicates(boxes, order, iou_threshold)]


def _free_crop(box: np.ndarray, score: float, width: int, height: int) -> Crop:
    x1, y1 = int(np.floor(box[0] + 0.5)), int(np.floor(box[1] + 0.5))
    x2 = min(max(int(np.floor(box[2] + 0.5)), x1 + 1), width)
    y2 = min(max(int(np.floor(box[3] + 0.5)), y1 + 1), height)
    return Crop((min(x1, x2 - 1), min(y1, y2 - 1), x2, y2), float(score), None)
