"""Step 5 of CAD generation: reject bad out-paints automatically, each with its reason.

Measured on the out-painted canvas at `WORK_SIDE` px (grey levels in [0, 1]) around the photo's
box; each measure is a ratio or a distance, so its threshold (settings `PROCROP_CAD__*`) does not
depend on the canvas size:

    seam      mean gradient across the box's edges (the pixels on both sides of the seam), over the
              median gradient inside the photo. A visible seam is a line of strong gradients the
              photo itself does not have.                          reject above `seam_max` (2.5)
    colour    distance between the mean RGB (0-1) of the fill next to the photo (a band of
              `BAND` px) and of the photo's own border band, plus the difference of their
              grey-level spreads.                                  reject above `colour_max` (0.35)
    detail    high-frequency energy (variance of the Laplacian) of the fill over that of the
              photo: a blurred, smeared fill has far less.         reject below `detail_min` (0.02)
    flat      grey-level standard deviation of the fill: a constant fill has none.
                                                                   reject below `flat_min` (0.02)
    repeat    the highest peak of the normalized autocorrelation of the fill's detail (grey minus
              its blur) away from the origin (lags of more than `MIN_LAG` px): tiles, grids and
              copied stripes make a high peak, smooth or random fills none.
                                                                   reject above `repeat_max` (0.6)

Only the sides where the photo does not touch the canvas edge have a seam or a band outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from shared.settings import CadSettings

WORK_SIDE = 512
BAND = 12  # px at WORK_SIDE
MIN_LAG = 12  # px at WORK_SIDE
REASONS = ("seam", "colour", "detail", "flat", "repeat")


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)


def judge(image: Image.Image, box: tuple[int, int, int, int], cad: CadSettings) -> Verdict:
    """Measure the out-paint of `image` around the photo at pixel `box` and decide."""
    metrics = measure(image, box)
    reasons = []
    if metrics["seam"] > cad.seam_max:
        reasons.append("seam")
    if metrics["colour"] > cad.colour_max:
        reasons.append("colour")
    if metrics["detail"] < cad.detail_min:
        reasons.append("detail")
    if metrics["flat"] < cad.flat_min:
        reasons.append("flat")
    if metrics["repeat"] > cad.repeat_max:
        reasons.append("repeat")
    return Verdict(not reasons, tuple(reasons), metrics)


def measure(image: Image.Image, box: tuple[int, int, int, int]) -> dict[str, float]:
    width, height = image.size
    scale = min(1.0, WORK_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), np.float32) / 255
    grey = rgb.mean(axis=2)
    h, w = grey.shape
    x1, y1, x2, y2 = (
        round(box[0] * scale), round(box[1] * scale), round(box[2] * scale), round(box[3] * scale)
    )  # fmt: skip
    known = np.zeros((h, w), bool)
    known[y1:y2, x1:x2] = True
    fill = ~known
    if not fill.any():
        return {"seam": 0.0, "colour": 0.0, "detail": 1.0, "flat": 1.0, "repeat": 0.0}

    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    inner = known.copy()
    inner[: y1 + 2], inner[y2 - 2 :], inner[:, : x1 + 2], inner[:, x2 - 2 :] = (
        False,
        False,
        False,
        False,
    )
    seam_line = _box_edges(known, width=2)
    photo_gradient = float(np.median(gradient[inner])) if inner.any() else 0.0
    seam = float(gradient[seam_line].mean()) / max(photo_gradient, 1e-3) if seam_line.any() else 0.0

    grown = cv2.dilate(known.astype(np.uint8), np.ones((2 * BAND + 1,) * 2, np.uint8)).astype(bool)
    shrunk = cv2.erode(known.astype(np.uint8), np.ones((2 * BAND + 1,) * 2, np.uint8)).astype(bool)
    outside, inside = grown & fill, known & ~shrunk
    colour = float(np.linalg.norm(rgb[outside].mean(0) - rgb[inside].mean(0)))
    colour += abs(float(grey[outside].std()) - float(grey[inside].std()))

    laplacian = cv2.Laplacian(grey, cv2.CV_32F)
    detail = float(laplacian[fill].var()) / max(
        float(laplacian[inner if inner.any() else known].var()), 1e-8
    )
    flat = float(grey[fill].std())
    return {
        "seam": round(seam, 4),
        "colour": round(colour, 4),
        "detail": round(detail, 4),
        "flat": round(flat, 4),
        "repeat": round(_repeat(grey, fill), 4),
    }


def _box_edges(known: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the photo's box edges, on both sides, where the fill meets it."""
    k = known.astype(np.uint8)
    kernel = np.ones((2 * width + 1,) * 2, np.uint8)
    ring = cv2.dilate(k, kernel).astype(bool) & ~cv2.erode(k, kernel).astype(bool)
    # Drop the parts of the ring on the canvas border (a photo flush with the edge has no seam).
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = False, False, False, False
    return ring


def _repeat(grey: np.ndarray, fill: np.ndarray) -> float:
    """The largest normalized autocorrelation of the fill at a lag of more than MIN_LAG px."""
    detail = grey - cv2.GaussianBlur(grey, (0, 0), 3.0)  # smooth gradients correlate at any lag
    values = np.where(fill, detail - detail[fill].mean(), 0.0).astype(np.float32)
    h, w = values.shape
    spectrum = np.fft.rfft2(values, s=(2 * h, 2 * w))
    corr = np.fft.irfft2(spectrum * np.conj(spectrum), s=(2 * h, 2 * w))
    overlap = np.fft.irfft2(
        np.abs(np.fft.rfft2(fill.astype(np.float32), s=(2 * h, 2 * w))) ** 2, s=(2 * h, 2 * w)
    )
    zero = corr[0, 0]
    if zero <= 0:
        return 0.0
    # Normalize by how many fill pixels overlap at each lag; ignore lags with little overlap.
    support = overlap / max(overlap[0, 0], 1.0)
    corr = np.where(support > 0.25, corr / np.maximum(support, 1e-6) / zero, 0.0)
    ys, xs = np.ogrid[: 2 * h, : 2 * w]
    near = (np.minimum(ys, 2 * h - ys) <= MIN_LAG) & (np.minimum(xs, 2 * w - xs) <= MIN_LAG)
    corr[near] = 0.0
    return float(corr.max())
