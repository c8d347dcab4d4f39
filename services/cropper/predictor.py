"""Crop inference: photos -> ranked, diverse crops in pixel coordinates, optionally at fixed ratios.

    predictor = build_predictor(settings)               # the shipped lite model by default
    results = predictor.crop(images, hashes, n=5, aspect_ratios=["16:9"])

Per batch: 1. working copies; 2. composition tokens + index vectors (the retrieval encoder; for
lite the same tokens are the backbone's cue maps); 3. top-K neighbours from the vector index and
their tokens from the object store; 4. BLIP multimodal tokens (paper profile); 5. the model's
ranked proposals; 6. near-duplicates suppressed, aspect ratios fitted, pixels rounded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.cropper.engine import predict
from services.cropper.inputs import (
    Neighbors,
    collate_inputs,
    neighbors_from,
    photo_tensors,
    working_copy,
)
from services.cropper.model import ProCrop
from services.cropper.postprocess import (
    AspectRatio,
    fit_aspect_ratio,
    parse_aspect_ratio,
    round_to_pixels,
    suppress_near_duplicates,
)
from services.embedder.base import CompositionEncoder
from services.retriever.search import Retriever
from services.retriever.token_store import TokenStore
from shared.boxes import box_iou, denormalize_xyxy

log = logging.getLogger(__name__)
MAX_CROPS = 100


@dataclass(frozen=True)
class Crop:
    box: tuple[int, int, int, int]  # pixel xyxy in the original photo
    score: float  # aesthetic score in (0, 1)
    aspect_ratio: str | None  # the requested "W:H" this crop has exactly, or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "score": round(self.score, 4),
            "aspect_ratio": self.aspect_ratio,
        }


@dataclass(frozen=True)
class CropResult:
    width: int
    height: int
    crops: list[Crop]  # best first

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "crops": [c.to_dict() for c in self.crops],
        }


@dataclass(frozen=True)
class Proposals:
    """Ranked model output for one photo: scores (Q,) and normalized xyxy boxes (Q, 4)."""

    scores: np.ndarray
    boxes: np.ndarray


class CropPredictor:
    """Runs the crop model with its retrieval (and text) inputs; see the module docstring."""

    def __init__(
        self,
        model: ProCrop,
        encoder: CompositionEncoder,
        retriever: Retriever | None = None,
        tokens: TokenStore | None = None,
        text: Any = None,
        device: torch.device | None = None,
        batch_size: int = 16,
    ) -> None:
        self.model, self.encoder, self.retriever, self.tokens = model, encoder, retriever, tokens
        self.text, self.batch_size = text, batch_size
        self.device = device or torch.device("cpu")
        self.model.to(self.device).eval()
        config = model.config
        if config.use_retrieval and (retriever is None or tokens is None):
            raise ValueError("this model retrieves compositions: give it a retriever and tokens")
        if config.use_text and text is None:
            raise ValueError("this model reads BLIP text: give it a text embedder")

    def propose(
        self, images: Sequence[Image.Image], hashes: Sequence[str | None]
    ) -> list[Proposals]:
        """Ranked proposals for each photo (a photo of the index never retrieves itself)."""
        out: list[Proposals] = []
        for start in range(0, len(images), self.batch_size):
            batch = [working_copy(im) for im in images[start : start + self.batch_size]]
            out += self._propose_batch(batch, list(hashes[start : start + self.batch_size]))
        return out

    @torch.no_grad()
    def _propose_batch(
        self, copies: list[Image.Image], hashes: list[str | None]
    ) -> list[Proposals]:
        config = self.model.config
        embedding = self.encoder.encode(copies)
        cues = embedding.tokens if config.cue_channels else [None] * len(copies)
        photos = [photo_tensors(im, config, cues=c) for im, c in zip(copies, cues, strict=True)]
        neighbors = self._neighbors(embedding.vectors, hashes) if config.use_retrieval else None
        text = None
        if config.use_text:
            described = self.text.describe(copies).embedding
            text = [described.tokens[i][described.mask[i]] for i in range(len(copies))]
        inputs = collate_inputs(photos, neighbors, text).to(self.device)
        scores, boxes = predict(self.model, inputs)
        return [
            Proposals(s.cpu().numpy(), b.cpu().numpy()) for s, b in zip(scores, boxes, strict=True)
        ]

    def _neighbors(self, vectors: np.ndarray, hashes: list[str | None]) -> list[Neighbors]:
        assert self.retriever is not None and self.tokens is not None
        k = self.model.config.k
        rows = self.retriever.search_vectors(vectors, hashes, k)
        out = []
        for row in rows:
            grids = self.tokens.read_many([(n.tokens_key, n.token_row) for n in row])
            out.append(
                neighbors_from(grids, [n.crops_norm[0] if n.crops_norm else None for n in row], k)
            )
        return out

    def crop(
        self,
        images: Sequence[Image.Image],
        hashes: Sequence[str | None],
        n: int = 5,
        aspect_ratios: Sequence[str] = (),
    ) -> list[CropResult]:
        """`n` diverse crops per photo, or, with `aspect_ratios`, `n` per ratio, best first."""
        check_crop_request(n, aspect_ratios)
        ratios = [(text.replace(" ", ""), parse_aspect_ratio(text)) for text in aspect_ratios]
        return [
            select_crops(p, im.width, im.height, n, ratios)
            for p, im in zip(self.propose(images, hashes), images, strict=True)
        ]


def check_crop_request(n: int, aspect_ratios: Sequence[str]) -> None:
    """Raise ValueError, naming the argument, for a bad `n` or a malformed aspect ratio."""
    if not 1 <= n <= MAX_CROPS:
        raise ValueError(f"n must be between 1 and {MAX_CROPS}, got {n}")
    for text in aspect_ratios:
        parse_aspect_ratio(text)


def select_crops(
    proposals: Proposals, width: int, height: int, n: int, ratios: Sequence[tuple[str, AspectRatio]]
) -> CropResult:
    """Proposals -> the crops users get (pixel xyxy, inside the photo)."""
    boxes = denormalize_xyxy(proposals.boxes.astype(np.float64), width, height)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1e-3)  # never empty
    boxes[:, 2] = np.minimum(boxes[:, 2], width)
    boxes[:, 3] = np.minimum(boxes[:, 3], height)
    boxes[:, :2] = np.minimum(boxes[:, :2], boxes[:, 2:] - 1e-3)
    if not ratios:
        keep = suppress_near_duplicates(boxes, proposals.scores, max_keep=n)
        return CropResult(
            width, height, [_free_crop(boxes[i], proposals.scores[i], width, height) for i in keep]
        )
    crops = []
    for label, ratio in ratios:
        fitted = np.stack([fit_aspect_ratio(b, ratio, width, height) for b in boxes])
        # The least-adjusted proposals rank first: score times the IoU of the fitted with the raw.
        scores = proposals.scores * box_iou(fitted, boxes).diagonal()
        for i in suppress_near_duplicates(fitted, scores, max_keep=n):
            box = round_to_pixels(fitted[i], ratio, width, height)
            crops.append(Crop(tuple(int(v) for v in box), float(scores[i]), label))  # type: ignore[arg-type]
    crops.sort(key=lambda c: -c.score)
    return CropResult(width, height, crops)


def _free_crop(box: np.ndarray, score: float, width: int, height: int) -> Crop:
    x1, y1 = int(np.floor(box[0] + 0.5)), int(np.floor(box[1] + 0.5))
    x2 = min(max(int(np.floor(box[2] + 0.5)), x1 + 1), width)
    y2 = min(max(int(np.floor(box[3] + 0.5)), y1 + 1), height)
    return Crop((min(x1, x2 - 1), min(y1, y2 - 1), x2, y2), float(score), None)


def build_predictor(
    settings: Any, profile: str = "lite", model: str | None = None, collection: str | None = None
) -> CropPredictor:
    """The predictor for `profile`: `model` (a checkpoint or bundle location) or, for lite, the
    shipped bundle; retrieval from `collection` or the bundle's own index."""
    from services.cropper.bundle import INDEX_FILE, LITE_BUNDLE, install_bundle
    from services.cropper.checkpoint import load_checkpoint, open_location
    from services.embedder.registry import build_encoder
    from shared.devices import resolve_device
    from shared.errors import ModelLoadError, ProCropError
    from shared.storage import LocalObjectStore, build_object_store
    from shared.vector_index import open_index

    location = model or settings.crop.model
    if location is None:
        if profile != "lite":
            raise ProCropError(
                "the paper profile has no shipped model: give --model (or PROCROP_CROP__MODEL)"
            )
        location = str(LITE_BUNDLE)
    crop_model, info = load_checkpoint(*open_location(location, settings))
    if crop_model.config.profile != profile:
        raise ModelLoadError(
            f"{location} holds a {crop_model.config.profile!r} model, not {profile!r}"
        )
    encoder = build_encoder(settings.embedder, "lite" if profile == "lite" else "sam")
    retriever = tokens = None
    if crop_model.config.use_retrieval:
        index, store = open_index(settings), build_object_store(settings)
        name = collection or settings.crop.collection
        if name is None:
            if not (
                LocalObjectStore(location).exists(INDEX_FILE) if "://" not in location else False
            ):
                raise ProCropError(f"{location} has no composition index: give --collection")
            name = install_bundle(location, index, store)
        retriever, tokens = Retriever(name, encoder, index), TokenStore(store, name)
    text = None
    if crop_model.config.use_text:
        from services.embedder.blip import build_blip

        text = build_blip(settings.embedder)
    device = resolve_device(settings.crop.device)
    log.info("crop model %s (%s)", location, info.get("epoch", "?"))
    return CropPredictor(
        crop_model, encoder, retriever, tokens, text, device, settings.crop.batch_size
    )
