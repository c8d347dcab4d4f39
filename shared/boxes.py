"""Box conventions and geometry, in one place.

Two conventions, and one in between:
- inside models: normalized (cx, cy, w, h), each in [0, 1] of the image;
- at the edges (APIs, files, metrics): pixel (x1, y1, x2, y2), x2/y2 exclusive.
- Normalized (x1, y1, x2, y2) is the stored form of a crop whose photo is not at hand (annotations
  in the index, `crops_norm`; neighbours' crops; training labels under windows and flips). It is
  the pixel convention divided by the photo's size, so it survives a resize of the photo, and
  window / flip arithmetic stays the same as on pixels; it becomes cxcywh only at the model's
  input (`xyxy_to_cxcywh`) and pixels only at the edge (`denormalize_xyxy`).

Every function takes numpy arrays or torch tensors of shape (..., 4) and returns the same kind,
so the model (torch) and the services (numpy) share one implementation. torch is never imported.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, TypeVar

import numpy as np

Array = TypeVar("Array", bound=Any)  # np.ndarray or torch.Tensor


def _xp(x: Any) -> ModuleType:
    """The array module of `x`: numpy, or torch for tensors (without importing torch here)."""
    if type(x).__module__.startswith("torch"):
        import sys

        return sys.modules["torch"]
    return np


def _stack(xp: ModuleType, parts: list[Any]) -> Any:
    return xp.stack(parts, -1) if xp is not np else np.stack(parts, axis=-1)


def cxcywh_to_xyxy(boxes: Array) -> Array:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2 (same units)."""
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return _stack(_xp(boxes), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def xyxy_to_cxcywh(boxes: Array) -> Array:
    """(..., 4) x1, y1, x2, y2 -> (..., 4) cx, cy, w, h (same units)."""
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return _stack(_xp(boxes), [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])


def xywh_to_xyxy(boxes: Array) -> Array:
    """(..., 4) x, y, w, h (FCDB annotations) -> (..., 4) x1, y1, x2, y2."""
    x, y, w, h = (boxes[..., i] for i in range(4))
    return _stack(_xp(boxes), [x, y, x + w, y + h])


def normalize_xyxy(boxes: Array, width: float, height: float) -> Array:
    """Pixel xyxy -> normalized xyxy in [0, 1] of an image of `width` x `height` pixels."""
    scale = _scale_like(boxes, width, height)
    return boxes / scale


def denormalize_xyxy(boxes: Array, width: float, height: float) -> Array:
    """Normalized xyxy -> pixel xyxy of an image of `width` x `height` pixels."""
    return boxes * _scale_like(boxes, width, height)


def _scale_like(boxes: Any, width: float, height: float) -> Any:
    xp = _xp(boxes)
    values = [width, height, width, height]
    if xp is np:
        return np.asarray(values, dtype=np.result_type(boxes, np.float32))
    return xp.tensor(values, dtype=boxes.dtype, device=boxes.device)


def clip_xyxy(boxes: Array, width: float, height: float) -> Array:
    """Clip xyxy boxes into [0, width] x [0, height] (use 1, 1 for normalized boxes)."""
    xp = _xp(boxes)
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    if xp is np:
        parts = [np.clip(x1, 0, width), np.clip(y1, 0, height)]
        parts += [np.clip(x2, 0, width), np.clip(y2, 0, height)]
    else:
        parts = [x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)]
    return _stack(xp, parts)


def box_area(boxes: Array) -> Array:
    """(..., 4) xyxy -> (...) areas; inverted boxes have area <= 0."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_union(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Pairwise intersection, union and enclosing box area of (N, 4) and (M, 4) xyxy boxes."""
    xp = _xp(a)
    lt = xp.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = xp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = rb - lt
    wh = np.clip(wh, 0, None) if xp is np else wh.clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    outer = xp.maximum(a[:, None, 2:], b[None, :, 2:]) - xp.minimum(a[:, None, :2], b[None, :, :2])
    return inter, union, outer[..., 0] * outer[..., 1]


def box_iou(a: Array, b: Array) -> Array:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M), in [0, 1]."""
    inter, union, _ = _intersection_union(a, b)
    return inter / union


def generalized_box_iou(a: Array, b: Array) -> Array:
    """Pairwise GIoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes -> (N, M), in [-1, 1]."""
    inter, union, enclosing = _intersection_union(a, b)
    return inter / union - (enclosing - union) / enclosing


def flip_xyxy(boxes: Array) -> Array:
    """Mirror normalized (..., 4) xyxy boxes left-right."""
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return _stack(_xp(boxes), [1 - x2, y1, 1 - x1, y2])


def median_box(boxes: np.ndarray) -> np.ndarray | None:
    """The per-coordinate median of (N, 4) boxes (kNN crop transfer), or None when N is 0."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.median(boxes, axis=0) if len(boxes) else None
