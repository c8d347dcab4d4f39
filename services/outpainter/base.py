"""What the CAD pipeline's stages exchange, and the out-painter interface.

A *canvas* is the professional photo, down-scaled and placed on a larger frame; `known` marks the
photo's pixels, everything else is to be out-painted. `region` is where the photo sits, in
normalized xyxy of the canvas: the item's first crop label. *Controls* are the photo's multi-scale
segment masks placed on the canvas (`services.embedder.masks`), one label map per scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Canvas:
    """A photo placed on a frame to out-paint.

    image:  RGB, canvas size; outside the photo a neutral grey (the fill replaces it).
    known:  (H, W) bool, True on the photo's pixels.
    region: normalized xyxy of the photo on the canvas.
    """

    image: Image.Image
    known: np.ndarray
    region: Box

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


class Outpainter(Protocol):
    """Fills each canvas outside its photo. The photo's own pixels come back unchanged.

    Arguments line up by index: `prompts[i]` says what lies beyond canvas i's photo, `controls[i]`
    is its (S, H, W) uint16 mask label maps on the canvas (0: no segment / outside the photo), and
    `seeds[i]` makes the fill of item i repeatable whatever batch it runs in.
    """

    name: str  # recorded in run.json with `version`
    version: str  # model ids and weight digests, or the library version

    def outpaint(
        self,
        canvases: Sequence[Canvas],
        prompts: Sequence[str],
        controls: Sequence[np.ndarray],
        seeds: Sequence[int],
    ) -> list[Image.Image]: ...


def paste_known(canvas: Canvas, filled: Image.Image) -> Image.Image:
    """`filled` with the canvas's photo pixels put back exactly (an out-painter may alter them)."""
    if filled.size != canvas.size:
        filled = filled.resize(canvas.size, Image.Resampling.LANCZOS)
    out = np.asarray(filled.convert("RGB")).copy()
    out[canvas.known] = np.asarray(canvas.image)[canvas.known]
    return Image.fromarray(out)
