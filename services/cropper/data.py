"""Training data: annotated photos with their retrieved neighbours, and the views the model sees.

One photo gives many training pairs: any window of the photo that contains its crops is a valid
"uncropped" view with the same crops as labels (the CAD idea, with real context where CAD has
out-painted context), and so is its mirror image. Boxes are normalized xyxy here; targets leave as
cxcywh, the model's convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from services.cropper.config import ModelConfig
from services.cropper.inputs import PhotoArrays, batch_arrays, photo_arrays
from services.cropper.model import CropInputs
from services.retriever.neighbors import Neighbors
from shared.boxes import flip_xyxy, xyxy_to_cxcywh


@dataclass(frozen=True)
class TrainPhoto:
    """A working copy of a photo with its crops (G, 4) normalized xyxy, best first, their score
    targets (G,) in (0, 1], its K neighbours and (L, D) text tokens (when the model reads text)."""

    name: str
    image: Image.Image
    crops: np.ndarray
    weights: np.ndarray
    neighbors: Neighbors | None = None
    text: np.ndarray | None = None


@dataclass(frozen=True)
class Augment:
    """window_prob: chance of a random window that still contains every crop; flip_prob: mirror."""

    window_prob: float = 0.5
    flip_prob: float = 0.5


@dataclass(frozen=True)
class Sample:
    photo: PhotoArrays
    neighbors: Neighbors | None
    text: np.ndarray | None
    targets: torch.Tensor  # (G, 4) cxcywh
    weights: torch.Tensor  # (G,)


class CropDataset(Dataset):
    """Views of `photos`; the random draw depends only on (seed, epoch, index), so runs repeat."""

    def __init__(
        self,
        photos: list[TrainPhoto],
        config: ModelConfig,
        augment: Augment | None = None,
        seed: int = 0,
        views: Any = None,
    ) -> None:
        """`views`: a `services.cropper.views.ViewCache` of these photos (features backbone): a
        sample is then one of its encoded views (view 0 without `augment`)."""
        self.photos, self.config, self.augment, self.seed = photos, config, augment, seed
        self.views = views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, index: int) -> Sample:
        if self.views is not None:
            return self._encoded_view(index)
        photo = self.photos[index]
        image, crops, neighbors = photo.image, photo.crops, photo.neighbors
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if rng.random() < self.augment.window_prob:
                image, crops = random_window(image, crops, rng)
            if rng.random() < self.augment.flip_prob:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crops = flip_xyxy(crops)
                neighbors = neighbors.flipped() if neighbors is not None else None
        targets = torch.from_numpy(xyxy_to_cxcywh(crops).astype(np.float32))
        return Sample(
            photo_arrays(image, self.config),
            neighbors if self.config.use_retrieval else None,
            photo.text if self.config.use_text else None,
            targets,
            torch.from_numpy(photo.weights.astype(np.float32)),
        )

    def _encoded_view(self, index: int) -> Sample:
        photo, views = self.photos[index], self.views
        view = 0
        if self.augment is not None:
            view = int(np.random.default_rng((self.seed, self.epoch, index)).integers(views.count))
        neighbors = photo.neighbors if self.config.use_retrieval else None
        if neighbors is not None and views.flipped[index, view]:
            neighbors = neighbors.flipped()
        cells = views.features[index, view].astype(np.float32)
        crops = views.crops[index][view]
        return Sample(
            PhotoArrays(None, float(views.aspect[index, view]), cells),
            neighbors,
            photo.text if self.config.use_text else None,
            torch.from_numpy(xyxy_to_cxcywh(crops).astype(np.float32)),
            torch.from_numpy(photo.weights.astype(np.float32)),
        )


def collate(samples: list[Sample]) -> tuple[CropInputs, list[torch.Tensor], list[torch.Tensor]]:
    """Samples -> (model inputs, targets (G_b, 4) cxcywh, score targets (G_b,))."""
    first = samples[0]
    arrays = batch_arrays(
        [s.photo for s in samples],
        [s.neighbors for s in samples] if first.neighbors is not None else None,  # type: ignore[misc]
        [s.text for s in samples] if first.text is not None else None,  # type: ignore[misc]
    )
    return (
        CropInputs.from_arrays(arrays),
        [s.targets for s in samples],
        [s.weights for s in samples],
    )


def random_window(
    image: Image.Image, crops: np.ndarray, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """A random sub-window of the photo containing every crop; crops re-expressed in it.

    Each side of the window is drawn uniformly between the photo's edge and the crops' hull.
    """
    hull = np.concatenate([crops[:, :2].min(0), crops[:, 2:].max(0)])  # (4,) xyxy
    x1, y1 = rng.uniform(0, hull[0]), rng.uniform(0, hull[1])
    x2, y2 = rng.uniform(hull[2], 1), rng.uniform(hull[3], 1)
    w, h = image.size
    px = (round(x1 * w), round(y1 * h), max(round(x2 * w), round(x1 * w) + 1),
          max(round(y2 * h), round(y1 * h) + 1))  # fmt: skip
    window = np.array([px[0] / w, px[1] / h, px[2] / w, px[3] / h])
    scale = np.tile(window[2:] - window[:2], 2)
    inside = np.clip((crops - np.tile(window[:2], 2)) / scale, 0.0, 1.0)
    return image.crop(px), inside
