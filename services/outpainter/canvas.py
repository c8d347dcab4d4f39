"""Step 1 of CAD generation: the photo, down-scaled at random, placed at random on a larger canvas.

Each (photo, variant) of a run draws its own plan from a seed derived from (run seed, photo hash,
variant), so a run repeated, resumed or redelivered draws the same canvases. Canvas sides are
drawn in [canvas_min, canvas_max]; the photo keeps its aspect ratio and is scaled to a share in
[scale_min, scale_max] of the largest size that fits the canvas (a small photo may come out
enlarged; photos under `min_photo_side` are refused before planning).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.outpainter.base import Canvas
from shared.errors import InvalidImageError
from shared.settings import CadSettings

FILL_GREY = 127  # the canvas outside the photo before out-painting


def item_seed(run_seed: int, sha256: str, variant: int) -> int:
    """The seed of one item: the same (run seed, photo, variant) always gives the same draws."""
    digest = hashlib.sha256(f"{run_seed}:{sha256}:{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # fits torch's and numpy's 63-bit seeds


@dataclass(frozen=True)
class Placement:
    """Where the photo goes: canvas size, and the photo's pixel box on it (x1, y1, x2, y2)."""

    canvas_w: int
    canvas_h: int
    box: tuple[int, int, int, int]

    @property
    def region(self) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 / self.canvas_w, y1 / self.canvas_h, x2 / self.canvas_w, y2 / self.canvas_h)

    def to_dict(self) -> dict[str, object]:
        return {"canvas": [self.canvas_w, self.canvas_h], "box": list(self.box)}


def plan_placement(photo_size: tuple[int, int], seed: int, cad: CadSettings) -> Placement:
    """Draw the canvas and the photo's place on it (see the module docstring)."""
    width, height = photo_size
    if min(width, height) < cad.min_photo_side:
        raise InvalidImageError(
            f"photo is {width}x{height} px; CAD needs at least {cad.min_photo_side} px a side"
        )
    rng = np.random.default_rng(seed)
    canvas_w, canvas_h = (int(v) for v in rng.integers(cad.canvas_min, cad.canvas_max + 1, 2))
    fit = min(canvas_w / width, canvas_h / height)
    scale = fit * float(rng.uniform(cad.scale_min, cad.scale_max))
    w = max(1, min(canvas_w, round(width * scale)))
    h = max(1, min(canvas_h, round(height * scale)))
    x = int(rng.integers(0, canvas_w - w + 1))
    y = int(rng.integers(0, canvas_h - h + 1))
    return Placement(canvas_w, canvas_h, (x, y, x + w, y + h))


def place(photo: Image.Image, placement: Placement) -> Canvas:
    """The canvas: grey, with the photo resized into its box."""
    x1, y1, x2, y2 = placement.box
    canvas = Image.new("RGB", (placement.canvas_w, placement.canvas_h), (FILL_GREY,) * 3)
    canvas.paste(
        photo.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1)
    )
    known = np.zeros((placement.canvas_h, placement.canvas_w), bool)
    known[y1:y2, x1:x2] = True
    return Canvas(canvas, known, placement.region)


def place_masks(masks: np.ndarray, placement: Placement) -> np.ndarray:
    """(S, h, w) label maps of the photo -> (S, H, W) on the canvas (0 outside the photo)."""
    x1, y1, x2, y2 = placement.box
    out = np.zeros((masks.shape[0], placement.canvas_h, placement.canvas_w), np.uint16)
    for s, labels in enumerate(masks):
        resized = Image.fromarray(labels.astype(np.int32)).resize(
            (x2 - x1, y2 - y1), Image.Resampling.NEAREST
        )
        out[s, y1:y2, x1:x2] = np.asarray(resized, np.int32).astype(np.uint16)
    return out
