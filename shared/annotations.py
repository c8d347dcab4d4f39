"""Crop annotation files, read into one form: photo file name -> normalized xyxy crops.

FCDB (`annotations.json`): a list of `{"image", "width", "height", "crop_xywh": [x, y, w, h]}` in
pixels. A few FCDB crops run a pixel or two past the photo: they are clipped. A few others (32 of
the 1,369 training photos) lie far outside their photo, in the coordinates of a larger original we
do not have: those records are skipped and logged, not guessed at.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.boxes import clip_xyxy, normalize_xyxy, xywh_to_xyxy
from shared.errors import ProCropError

log = logging.getLogger(__name__)
OVERRUN_TOLERANCE = 0.01  # crops may run this far (of the side) past the photo, and are clipped


@dataclass(frozen=True)
class AnnotatedPhoto:
    """A photo's file name, its size in pixels, and its crops as normalized xyxy boxes."""

    image: str
    width: int
    height: int
    crops_norm: tuple[tuple[float, float, float, float], ...]


def load_fcdb(path: str | Path) -> dict[str, AnnotatedPhoto]:
    """Read an FCDB-format annotation file; raise `ProCropError` naming the file if malformed."""
    try:
        records = json.loads(Path(path).read_text())
        photos = [_fcdb_record(r) for r in records]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ProCropError(f"{path}: not an FCDB annotation file ({exc})") from None
    valid = {p.image: p for p in photos if p is not None}
    if len(valid) < len(photos):
        log.warning(
            "%s: skipped %d crops that lie outside their photo", path, len(photos) - len(valid)
        )
    return valid


def _fcdb_record(record: dict) -> AnnotatedPhoto | None:
    width, height = int(record["width"]), int(record["height"])
    if width <= 0 or height <= 0:
        raise ValueError(f"bad size {width}x{height} for {record['image']}")
    box = normalize_xyxy(xywh_to_xyxy(np.asarray(record["crop_xywh"], np.float64)), width, height)
    if box.min() < -OVERRUN_TOLERANCE or box.max() > 1 + OVERRUN_TOLERANCE:
        return None
    box = clip_xyxy(box, 1.0, 1.0)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"empty crop for {record['image']}")
    crop = tuple(round(float(v), 6) for v in box)
    return AnnotatedPhoto(str(record["image"]), width, height, (crop,))  # type: ignore[arg-type]


def fixed_split(
    names: list[str], n_val: int = 200, seed: int = 2026
) -> tuple[list[str], list[str]]:
    """Split photo names into (train, val) the same way on every machine: sort, then shuffle by seed."""
    ordered = sorted(names)
    order = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted(ordered[i] for i in order[:n_val])
    train = sorted(ordered[i] for i in order[n_val:])
    return train, val
