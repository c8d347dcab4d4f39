"""Dual-space composition description for CAD: what is inside the frame, what lies beyond it.

`Describer.describe(photo, layout)` gets the photo and its layout cues (a sentence the pipeline
derives from the segment masks: where the large regions and the subjects are) and returns a
`Scene`: `inside` (the salient subjects and their layout), `beyond` (what plausibly continues past
each border) and `prompt`, the text the out-painter is conditioned on. The paper asked GPT-4;
the paper profile here captions with BLIP and asks a causal language model or an OpenAI-compatible
chat endpoint for the beyond (`services.embedder.language`); the lite profile writes both from
the layout cues and the colours along the photo's borders, with no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from shared.settings import CadSettings, EmbedderSettings


@dataclass(frozen=True)
class Scene:
    inside: str
    beyond: str
    prompt: str


class Describer(Protocol):
    name: str
    version: str

    def describe(self, photo: Image.Image, layout: str) -> Scene: ...


_SIDES = ("above", "below", "to the left", "to the right")


def colour_name(rgb: np.ndarray) -> str:
    """A plain name for a mean colour (0-255 RGB): brightness, then hue where it is saturated."""
    r, g, b = (float(v) / 255 for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    light = "dark" if hi < 0.3 else ("bright" if lo > 0.7 else "")
    if hi - lo < 0.12:
        hue = "white" if lo > 0.8 else ("black" if hi < 0.15 else "grey")
    else:
        h = (
            60 * ((g - b) / (hi - lo)) % 360
            if hi == r
            else 60 * ((b - r) / (hi - lo)) + 120
            if hi == g
            else 60 * ((r - g) / (hi - lo)) + 240
        )
        hue = (
            "red",
            "orange",
            "yellow",
            "green",
            "green",
            "cyan",
            "blue",
            "blue",
            "purple",
            "pink",
            "red",
        )[int(h // 36) % 11]
    return f"{light} {hue}".strip()


class LayoutDescriber:
    """The lite describer: the inside from the layout cues, the beyond from the colours along each
    border of the photo ('above: more bright blue; below: dark green ...'). No model."""

    name = "layout"
    version = "layout-1"

    def describe(self, photo: Image.Image, layout: str) -> Scene:
        rgb = np.asarray(photo.convert("RGB"), np.float32)
        band = max(1, min(rgb.shape[:2]) // 16)
        strips = (rgb[:band], rgb[-band:], rgb[:, :band], rgb[:, -band:])
        colours = [colour_name(s.reshape(-1, 3).mean(0)) for s in strips]
        beyond = "; ".join(f"{side}: more {c}" for side, c in zip(_SIDES, colours, strict=True))
        inside = f"a photograph with {layout}"
        prompt = f"a photograph, the scene continues naturally; {beyond}"
        return Scene(inside=inside, beyond=beyond, prompt=prompt)


def build_describer(cad: CadSettings, embedder: EmbedderSettings) -> Describer:
    """`layout` (no model), or `lm` / `chat`: a BLIP caption and a language model's beyond."""
    if cad.describer == "layout":
        return LayoutDescriber()
    from services.embedder.language import load_caption_describer

    return load_caption_describer(embedder, cad)
