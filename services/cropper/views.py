"""Training views encoded once: with a frozen pretrained encoder (the `features` backbone), each
photo's views (the photo itself, then random windows that keep its crops, some mirrored) go
through the encoder once, not once per epoch, and an epoch draws one stored view per photo.

    views = encode_views(photos, encoder, count=8, seed=0)        # (N, V, 64, C) feature cells
    dataset = CropDataset(photos, config, augment, views=views)

View 0 is the whole working copy, unmirrored: validation reads it. The draw of view v of photo i
depends only on (seed, i, v), so a cache file (keyed by the photos, the encoder version and the
draw) is reused by every run and fold that asks for the same views.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.cropper.data import TrainPhoto, random_window
from shared.boxes import flip_xyxy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewCache:
    """features (N, V, 64, C) float16; crops[i][v] (G, 4) normalized xyxy in view v of photo i;
    flipped (N, V) bool (the view is mirrored: so must its neighbours be); aspect (N, V) float32
    log(width / height) of each view."""

    features: np.ndarray
    crops: list[list[np.ndarray]]
    flipped: np.ndarray
    aspect: np.ndarray

    @property
    def count(self) -> int:
        return self.features.shape[1]


def draw_view(
    photo: TrainPhoto, index: int, view: int, seed: int, window_prob: float, flip_prob: float
) -> tuple[Image.Image, np.ndarray, bool]:
    """View `view` of photo `index`: (image, its crops, mirrored?). View 0 is the photo."""
    if view == 0:
        return photo.image, photo.crops, False
    rng = np.random.default_rng((seed, index, view))
    image, crops = photo.image, photo.crops
    if rng.random() < window_prob:
        image, crops = random_window(image, crops, rng)
    flip = bool(rng.random() < flip_prob)
    if flip:
        image, crops = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flip_xyxy(crops)
    return image, crops, flip


def encode_views(
    photos: Sequence[TrainPhoto],
    encoder: Any,
    count: int = 8,
    seed: int = 0,
    window_prob: float = 0.75,
    flip_prob: float = 0.5,
    cache_dir: str | Path | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ViewCache:
    """Encode `count` views of every photo with `encoder` (its `features` cells); read from and
    written to `cache_dir` when given."""
    key = _cache_key(photos, encoder, count, seed, window_prob, flip_prob)
    path = Path(cache_dir) / f"views-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        return _read(path, len(photos), count)
    features, crops, flipped, aspect = [], [], [], []
    for i, photo in enumerate(photos):
        drawn = [draw_view(photo, i, v, seed, window_prob, flip_prob) for v in range(count)]
        images = [image for image, _, _ in drawn]
        features.append(encoder.encode(images).features.astype(np.float16))
        crops.append([np.asarray(c, np.float64) for _, c, _ in drawn])
        flipped.append([f for _, _, f in drawn])
        aspect.append([np.log(im.width / im.height) for im in images])
        if on_progress:
            on_progress(1)
    views = ViewCache(
        np.stack(features), crops, np.asarray(flipped), np.asarray(aspect, np.float32)
    )
    if path is not None:
        _write(path, views)
    return views


def _cache_key(
    photos: Sequence[TrainPhoto], encoder: Any, count: int, seed: int, window: float, flip: float
) -> str:
    version = getattr(encoder, "features_version", encoder.version)  # cells, not tokens, are cached
    spec = [encoder.name, version, count, seed, window, flip, [p.name for p in photos]]
    spec.append([list(p.image.size) for p in photos])
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _write(path: Path, views: ViewCache) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n, v = views.flipped.shape
    g = max(len(c) for row in views.crops for c in row)
    boxes = np.zeros((n, v, g, 4), np.float64)
    sizes = np.zeros((n, v), np.int64)
    for i, row in enumerate(views.crops):
        for j, c in enumerate(row):
            boxes[i, j, : len(c)], sizes[i, j] = c, len(c)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, features=views.features, boxes=boxes, sizes=sizes,
             flipped=views.flipped, aspect=views.aspect)  # fmt: skip
    partial.replace(path)  # readers never see half a cache


def _read(path: Path, photos: int, count: int) -> ViewCache:
    data = np.load(path)
    boxes, sizes = data["boxes"], data["sizes"]
    if boxes.shape[:2] != (photos, count):
        raise ValueError(f"{path}: a view cache of another shape {boxes.shape[:2]}")
    crops = [[boxes[i, j, : sizes[i, j]] for j in range(count)] for i in range(photos)]
    log.info("read %d x %d encoded views from %s", photos, count, path)
    return ViewCache(data["features"], crops, data["flipped"], data["aspect"])
