"""Photo -> model inputs, the same way in training and at inference.

A photo is first brought to a working copy (longest side `WORK_SIDE`); the model sees it resized
to `input_size` squared, its log aspect ratio, the weight-free cue tokens (lite backbone) and the
K retrieved neighbours (composition tokens + crops, `services.retriever.neighbors`). Boxes here
are normalized; neighbour crops arrive as xyxy and leave as cxcywh, the model's convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.cropper.config import ModelConfig
from services.embedder.base import IMAGENET_MEAN, IMAGENET_STD
from services.embedder.lite import describe
from services.retriever.neighbors import Neighbors
from shared.boxes import xyxy_to_cxcywh

WORK_SIDE = 256  # working copy: enough for a 128-pixel model input and the 8 x 8 cue grid


FEATURES_WORK_SIDE = 512  # features backbone: windows of the copy still fill the encoder's 256 px


def work_side(config: ModelConfig) -> int:
    """Longest side of the working copy for `config`: never below the model's input size."""
    if config.backbone == "features":
        return FEATURES_WORK_SIDE
    return max(WORK_SIDE, config.input_size)


def working_copy(image: Image.Image, side: int = WORK_SIDE) -> Image.Image:
    """The photo with its longest side at most `side` (antialiased), in RGB."""
    image = image.convert("RGB")
    scale = side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


@dataclass(frozen=True)
class PhotoArrays:
    """One photo as the model reads it (see `CropInputs` for shapes)."""

    image: np.ndarray | None  # (3, S, S) float32, ImageNet-normalized (None: features backbone)
    aspect: float  # log(width / height)
    cues: np.ndarray | None  # (64, C) float32


def photo_arrays(
    image: Image.Image, config: ModelConfig, cues: np.ndarray | None = None
) -> PhotoArrays:
    """A working copy -> pixels, aspect and cue tokens for `config`; `cues` (64, C), when given,
    are the photo's lite tokens already computed (by the retrieval encoder), or, for the features
    backbone, the encoder's feature cells (required: no pixels are read then)."""
    aspect = float(np.log(image.width / image.height))
    if config.backbone == "features":
        if cues is None:
            raise ValueError("the features backbone needs the photo's encoder feature cells")
        return PhotoArrays(None, aspect, np.asarray(cues, np.float32))
    size = config.input_size
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S)
    cue_tokens = None
    if config.cue_channels:
        cue_tokens = np.asarray(describe(image) if cues is None else cues, np.float32)
    return PhotoArrays((pixels - IMAGENET_MEAN) / IMAGENET_STD, aspect, cue_tokens)


def batch_arrays(
    photos: list[PhotoArrays],
    neighbors: list[Neighbors] | None = None,
    text: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Stack photos (and their neighbours and (L, D) text tokens) into one batch, keyed by the
    names of `CropInputs` fields."""
    batch = {"aspect": np.asarray([p.aspect for p in photos], np.float32)}
    if photos[0].image is not None:
        batch["images"] = np.stack([p.image for p in photos]).astype(np.float32)  # type: ignore[misc]
    if photos[0].cues is not None:
        batch["cues"] = np.stack([p.cues for p in photos]).astype(np.float32)  # type: ignore[misc]
    if neighbors is not None:
        batch["tokens"] = np.stack([n.tokens for n in neighbors]).astype(np.float32)
        crops = np.stack([n.crops for n in neighbors]).astype(np.float64)  # (B, K, 4) xyxy
        batch["boxes"] = xyxy_to_cxcywh(crops).astype(np.float32)
        batch["box_mask"] = np.stack([n.has_crop for n in neighbors])
    if text is not None:
        batch["text"], batch["text_mask"] = _pad_text(text)
    return batch


def _pad_text(text: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(L_i, D) token rows (all-zero rows are padding) -> (B, L, D) and (B, L) mask."""
    length = max(len(t) for t in text)
    out = np.zeros((len(text), length, text[0].shape[1]), np.float32)
    mask = np.zeros((len(text), length), bool)
    for i, t in enumerate(text):
        out[i, : len(t)] = t
        mask[i, : len(t)] = np.abs(t).sum(1) > 0
        mask[i, 0] = True  # the first token ([CLS] / [ENC]) is always real
    return out, mask
