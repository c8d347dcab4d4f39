"""Crop inference: photos -> ranked, diverse crops in pixel coordinates, optionally at fixed ratios.

    predictor = build_predictor(settings)               # the shipped lite model by default
    results = predictor.crop(images, hashes, n=5, aspect_ratios=["16:9"])

Per batch: 1. working copies; 2. composition tokens + index vectors (the retrieval encoder; for
lite the same tokens are the backbone's cue maps); 3. the top-K neighbours (`retrieval`);
4. BLIP multimodal tokens (paper profile); 5. the model's ranked proposals (`runtime`: ONNX
Runtime or torch); 6. near-duplicates suppressed, aspect ratios fitted, pixels rounded.
This module imports no torch: the lite path runs on numpy and ONNX Runtime alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.cropper.config import ModelConfig
from services.cropper.inputs import (
    Neighbors,
    PhotoArrays,
    batch_arrays,
    photo_arrays,
)
from services.cropper.postprocess import (
    AspectRatio,
    fit_aspect_ratio,
    parse_aspect_ratio,
    round_to_pixels,
    suppress_near_duplicates,
)
from services.cropper.retrieval import Retrieval
from services.cropper.runtime import Runner
from services.embedder.base import CompositionEncoder
from shared.boxes import box_iou, denormalize_xyxy
from shared.crop_request import check_crop_request

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Prepared:
    """A photo's own model inputs, its index vector (D,) and the RGB photo (BLIP reads it)."""

    arrays: PhotoArrays
    vector: np.ndarray
    image: Image.Image
    sha256: str | None


class CropPredictor:
    """Runs the crop model with its retrieval (and text) inputs; see the module docstring."""

    def __init__(
        self,
        runner: Runner,
        encoder: CompositionEncoder,
        retrieval: Retrieval | None = None,
        text: Any = None,
        batch_size: int = 16,
    ) -> None:
        self.runner, self.encoder, self.retrieval, self.text = runner, encoder, retrieval, text
        self.batch_size = batch_size
        if self.config.use_retrieval and retrieval is None:
            raise ValueError("this model retrieves compositions: give it a retrieval")
        if self.config.use_text and text is None:
            raise ValueError("this model reads BLIP text: give it a text embedder")

    @property
    def config(self) -> ModelConfig:
        return self.runner.config

    def prepare(
        self, images: Sequence[Image.Image], hashes: Sequence[str | None]
    ) -> list[Prepared]:
        """Steps 1-2 for a batch: what each photo contributes on its own. Thread-safe, so callers
        can prepare the next batch while the model runs on this one."""
        config = self.config
        images = [im.convert("RGB") for im in images]
        # The model's pixels are resized from the photo itself (training resized its working
        # copies: the same bilinear, antialiased resize, one step instead of two). Retrieval vectors come from the photo itself, as the index was built (vectors of the
        # working copy cost 0.004 IoU on FCDB val). With the lite encoder its tokens are the cue
        # maps too: training took them from the working copy, but describing each photo twice
        # costs 5 ms and buys 0.001 IoU on FCDB val (0.7173 vs 0.7161).
        embedding = self.encoder.encode(images)
        return [
            Prepared(model_arrays(im, config, tokens), vector, im, sha)
            for im, tokens, vector, sha in zip(
                images, embedding.tokens, embedding.vectors, hashes, strict=True
            )
        ]

    def propose_prepared(self, prepared: Sequence[Prepared]) -> list[Proposals]:
        """Steps 3-5 for prepared photos, in one model batch."""
        config = self.config
        neighbors = None
        if config.use_retrieval:
            assert self.retrieval is not None
            vectors = np.stack([p.vector for p in prepared])
            neighbors = self.retrieval.neighbors(vectors, [p.sha256 for p in prepared])
        text = None
        if config.use_text:
            described = self.text.describe([p.image for p in prepared]).embedding
            text = [described.tokens[i][described.mask[i]] for i in range(len(prepared))]
        return run_model(self.runner, [p.arrays for p in prepared], neighbors, text)

    def propose(
        self, images: Sequence[Image.Image], hashes: Sequence[str | None]
    ) -> list[Proposals]:
        """Ranked proposals for each photo (a photo of the index never retrieves itself)."""
        out: list[Proposals] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            out += self.propose_prepared(self.prepare(images[start:end], hashes[start:end]))
        return out

    def search_vectors(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) index vectors of the photos, from the encoder the index was built with."""
        return self.encoder.encode([im.convert("RGB") for im in images]).vectors

    def crop(
        self,
        images: Sequence[Image.Image],
        hashes: Sequence[str | None],
        n: int = 5,
        aspect_ratios: Sequence[str] = (),
    ) -> list[CropResult]:
        """`n` diverse crops per photo, or, with `aspect_ratios`, `n` per ratio, best first."""
        check_crop_request(n, aspect_ratios)
        sizes = [im.size for im in images]
        return crops_for(self.propose(images, hashes), sizes, n, aspect_ratios)


def model_arrays(image: Image.Image, config: ModelConfig, tokens: np.ndarray) -> PhotoArrays:
    """A photo's own model inputs; `tokens` (64, T) are its composition tokens from the retrieval
    encoder, which double as the lite backbone's cue maps when their width matches."""
    reuse = config.cue_channels and tokens.shape[-1] == config.cue_channels
    return photo_arrays(image, config, tokens if reuse else None)


def run_model(
    runner: Runner,
    arrays: Sequence[PhotoArrays],
    neighbors: Sequence[Neighbors] | None,
    text: Sequence[np.ndarray] | None,
) -> list[Proposals]:
    """One model batch: photos (+ their K neighbours, + (L, D) text tokens) -> ranked proposals."""
    batch = batch_arrays(
        list(arrays),
        list(neighbors) if neighbors is not None else None,
        list(text) if text is not None else None,
    )
    scores, boxes = runner(batch)
    return [Proposals(s, b) for s, b in zip(scores, boxes, strict=True)]


def crops_for(
    proposals: Sequence[Proposals],
    sizes: Sequence[tuple[int, int]],
    n: int,
    aspect_ratios: Sequence[str],
) -> list[CropResult]:
    """Proposals of photos of these (width, height) -> the crops users get."""
    ratios = [(text.replace(" ", ""), parse_aspect_ratio(text)) for text in aspect_ratios]
    return [select_crops(p, w, h, n, ratios) for p, (w, h) in zip(proposals, sizes, strict=True)]


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


def model_location(settings: Any, profile: str = "lite", model: str | None = None) -> str:
    """Where the crop model is: `model`, else PROCROP_CROP__MODEL, else (lite) the shipped bundle."""
    from services.cropper.bundle import LITE_BUNDLE
    from shared.errors import ProCropError

    location = model or settings.crop.model
    if location is None:
        if profile != "lite":
            raise ProCropError(
                "the paper profile has no shipped model: give --model (or PROCROP_CROP__MODEL)"
            )
        location = str(LITE_BUNDLE)
    return str(location)


def build_predictor(
    settings: Any, profile: str = "lite", model: str | None = None, collection: str | None = None
) -> CropPredictor:
    """The predictor for `profile`: `model` (a checkpoint or bundle location) or, for lite, the
    shipped bundle. Neighbours come from `collection` (Milvus) or else the bundle's own index.
    A bundle with `model.onnx` runs on ONNX Runtime on a CPU unless PROCROP_CROP__RUNTIME=torch."""
    from services.cropper.bundle import INDEX_FILE
    from services.embedder.registry import build_encoder
    from shared.errors import ModelLoadError, ProCropError

    location = model_location(settings, profile, model)
    runner = build_runner(settings, location)
    if runner.config.profile != profile:
        raise ModelLoadError(f"{location} holds a {runner.config.profile!r} model, not {profile!r}")
    encoder = build_encoder(settings.embedder, "lite" if profile == "lite" else "sam")
    retrieval: Retrieval | None = None
    if runner.config.use_retrieval:
        name = collection or settings.crop.collection
        bundle_index = Path(location) / INDEX_FILE if "://" not in location else None
        if name is not None:
            retrieval = _milvus_retrieval(settings, name, encoder, runner.config.k)
        elif bundle_index is not None and bundle_index.is_file():
            from services.cropper.retrieval import BundleRetrieval

            retrieval = BundleRetrieval(bundle_index, runner.config.k, encoder.spec)
        else:
            raise ProCropError(f"{location} has no composition index: give --collection")
    text = None
    if runner.config.use_text:
        from services.embedder.blip import build_blip

        text = build_blip(settings.embedder)
    return CropPredictor(runner, encoder, retrieval, text, settings.crop.batch_size)


def build_runner(settings: Any, location: str) -> Runner:
    """ONNX Runtime for a bundle that has `model.onnx` (on a CPU), else torch."""
    from services.cropper.runtime import ONNX_FILE, OnnxRunner, TorchRunner

    onnx = Path(location) / ONNX_FILE if "://" not in location else None
    want = settings.crop.runtime
    if (
        onnx is not None
        and onnx.is_file()
        and want != "torch"
        and settings.crop.device in ("auto", "cpu")
    ):
        from services.cropper.config import config_from_json

        config, _ = config_from_json((Path(location) / "config.json").read_bytes(), location)
        if want == "onnx" or not _cuda_visible():
            return OnnxRunner(onnx, config)
    if want == "onnx":
        from shared.errors import ProCropError

        raise ProCropError(f"{location} has no {ONNX_FILE}; use PROCROP_CROP__RUNTIME=torch")
    from services.cropper.checkpoint import load_checkpoint
    from services.cropper.config import open_location
    from shared.devices import resolve_device

    crop_model, _ = load_checkpoint(*open_location(location, settings))
    return TorchRunner(crop_model, resolve_device(settings.crop.device))


def _cuda_visible() -> bool:
    """Whether a GPU is visible, without importing torch (which is what we want to avoid)."""
    import os

    return Path("/dev/nvidia0").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


def _milvus_retrieval(settings: Any, name: str, encoder: CompositionEncoder, k: int) -> Retrieval:
    from services.cropper.retrieval import MilvusRetrieval
    from services.retriever.search import Retriever
    from services.retriever.token_store import TokenStore
    from shared.storage import build_object_store
    from shared.vector_index import open_index

    index, store = open_index(settings), build_object_store(settings)
    return MilvusRetrieval(Retriever(name, encoder, index), TokenStore(store, name), k)
