"""Multi-scale segment masks of a photo: the CAD out-painter's control signal.

`MaskMaker.masks(photo)` returns (S, h, w) uint16 label maps at the photo's size, one per scale
(coarse to fine); 0 marks pixels no segment covers, 1..n the segments of that scale, largest first.
The paper profile uses SAM's automatic mask generator (`services.embedder.sam_masks`); the lite
profile segments with scikit-image's Felzenszwalb graph method at as many scales, no weights.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image

from shared.settings import CadSettings, EmbedderSettings


class MaskMaker(Protocol):
    name: str
    version: str

    def masks(self, photo: Image.Image) -> np.ndarray: ...


def relabel_by_area(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n by decreasing area (0 stays 0), as uint16."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.uint16)
    return lut[labels]


class SegmentMaskMaker:
    """Weight-free multi-scale segments: Felzenszwalb's graph segmentation (scikit-image) of the
    photo at `work_side` px, one label map per scale, coarse to fine, scaled back to the photo.

    Segments under 0.5 % of the photo are dropped (label 0) so each map keeps the regions that
    shape the composition, not the texture.
    """

    name = "segments"

    def __init__(self, scales: int = 2, work_side: int = 256) -> None:
        from importlib.metadata import version

        # Felzenszwalb's `scale`: larger merges more. Coarse first, each level 4x finer.
        self.levels = [1600.0 / 4**i for i in range(scales)]
        self.work_side = work_side
        self.version = f"felzenszwalb-{version('scikit-image')}-{scales}x{work_side}"

    def masks(self, photo: Image.Image) -> np.ndarray:
        from skimage.segmentation import felzenszwalb

        rgb = photo.convert("RGB")
        small = rgb.copy()
        small.thumbnail((self.work_side, self.work_side), Image.Resampling.BILINEAR)
        pixels = np.asarray(small, np.float32) / 255.0
        min_area = max(1, int(0.005 * pixels.shape[0] * pixels.shape[1]))
        maps = []
        for level in self.levels:
            labels = felzenszwalb(pixels, scale=level, sigma=0.8, min_size=min_area // 4) + 1
            ids, counts = np.unique(labels, return_counts=True)
            labels[np.isin(labels, ids[counts < min_area])] = 0
            full = Image.fromarray(relabel_by_area(labels).astype(np.int32)).resize(
                rgb.size, Image.Resampling.NEAREST
            )
            maps.append(np.asarray(full, np.int32).astype(np.uint16))
        return np.stack(maps)


def build_mask_maker(cad: CadSettings, embedder: EmbedderSettings) -> MaskMaker:
    """`segments` (weight-free) or `sam` (segment-anything's automatic mask generator), as
    `cad.masks` says."""
    if cad.masks == "segments":
        return SegmentMaskMaker(cad.mask_scales)
    from services.embedder.sam_masks import load_sam_mask_maker

    return load_sam_mask_maker(embedder, cad)


_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")


def layout_cues(labels: np.ndarray, most: int = 3) -> str:
    """A sentence on where the largest segments of one label map lie, e.g.
    'a large region (41%) across the bottom; a region (18%) at the top left'."""
    h, w = labels.shape
    parts = []
    for label in range(1, min(int(labels.max()), most) + 1):
        ys, xs = np.nonzero(labels == label)
        if len(xs) == 0:
            continue
        share = len(xs) / (h * w)
        row = _ROWS[min(2, int(3 * ys.mean() / h))]
        col = _COLS[min(2, int(3 * xs.mean() / w))]
        wide = (xs.max() - xs.min()) > 0.8 * w
        where = (
            f"across the {row}"
            if wide
            else ("in the centre" if (row, col) == ("middle", "centre") else f"at the {row} {col}")
        )
        size = (
            "a large region" if share > 0.3 else ("a region" if share > 0.08 else "a small subject")
        )
        parts.append(f"{size} ({share:.0%}) {where}")
    return "; ".join(parts) or "no distinct regions"
