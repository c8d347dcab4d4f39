"""The lite out-painter: OpenCV's in-painting, for machines with no GPU and no diffusion weights.

Same pipeline, only the fill differs. The border is filled by Telea's fast-marching in-painting
(`cv2.inpaint`) at a reduced resolution (`work_side`; in-painting cost grows with the area to fill),
scaled back up, and given back some texture: Gaussian grain with the photo's own high-frequency
spread, seeded per item. The result is smooth continuation of the border colours, not new content:
models trained on it can learn to find the seam, which is what the quality filter and the weak
supervision issue measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from services.outpainter.base import Canvas, paste_known

GRAIN = 0.4  # share of the photo's high-frequency spread added back to the fill


class LiteOutpainter:
    name = "lite"

    def __init__(self, work_side: int = 256, radius: int = 5) -> None:
        self.work_side, self.radius = work_side, radius
        self.version = f"opencv-{cv2.__version__}-telea-r{radius}-{work_side}"

    def outpaint(
        self,
        canvases: Sequence[Canvas],
        prompts: Sequence[str],
        controls: Sequence[np.ndarray],
        seeds: Sequence[int],
    ) -> list[Image.Image]:
        return [self._fill(c, s) for c, s in zip(canvases, seeds, strict=True)]

    def _fill(self, canvas: Canvas, seed: int) -> Image.Image:
        rgb = np.asarray(canvas.image)
        height, width = canvas.known.shape
        scale = min(1.0, self.work_side / max(width, height))
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA)
        unknown = cv2.resize(
            (~canvas.known).astype(np.uint8), small_size, interpolation=cv2.INTER_NEAREST
        )
        # Fill the ring of photo pixels the down-scale blended with grey as well.
        unknown = cv2.dilate(unknown, np.ones((3, 3), np.uint8))
        filled = cv2.inpaint(small, unknown, self.radius, cv2.INPAINT_TELEA)
        fill = cv2.resize(filled, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        out = np.clip(fill + self._grain(rgb, canvas.known, seed), 0, 255).astype(np.uint8)
        return paste_known(canvas, Image.fromarray(out))

    @staticmethod
    def _grain(rgb: np.ndarray, known: np.ndarray, seed: int) -> np.ndarray:
        """Seeded grain with the spread of the photo's detail (photo minus its blur), per channel."""
        photo = rgb.astype(np.float32)
        detail = photo - cv2.GaussianBlur(photo, (0, 0), 2.0)
        spread = detail[known].std(axis=0) if known.any() else np.zeros(3, np.float32)
        raw = np.random.default_rng(seed).standard_normal(rgb.shape).astype(np.float32)
        noise = np.asarray(cv2.GaussianBlur(raw, (0, 0), 0.7), np.float32)
        return noise / max(1e-6, float(noise.std())) * (GRAIN * spread)
