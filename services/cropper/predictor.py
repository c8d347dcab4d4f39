"""The one way photos become ranked crops: the CLI, `procrop eval`, the crop worker and the
pseudo-label rounds all call `CropPredictor`.

    predictor = build_predictor(settings)                       # the shipped lite model by default
    [result] = predictor.crop([image], [sha256], CropRequest.parse(n=5, aspect_ratios=["16:9"]))

Per photo: 1. its own inputs (`prepare`: pixels at the model's size, composition tokens and index
vector from the retrieval encoder; for lite the same tokens are the backbone's cue maps); 2. its
top-K neighbours (`services.retriever.neighbors`); 3. BLIP multimodal tokens (paper profile);
4. the model's ranked proposals (`runtime`: ONNX Runtime or torch); 5. the crops users get
(`postprocess`: near-duplicates suppressed, aspect ratios fitted, pixels rounded).
The crop worker gets steps 1-3 from the earlier stages of its chain (`crop_precomputed`).
This module imports no torch: the lite path runs on numpy and ONNX Runtime alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from services.cropper.config import ModelConfig
from services.cropper.inputs import PhotoArrays, batch_arrays, photo_arrays
from services.cropper.postprocess import CropRequest, CropResult, fuse_with_transfer, select_crops
from services.cropper.runtime import Runner, build_runner
from services.embedder.base import CompositionEncoder
from services.retriever.neighbors import Neighbors, Retrieval
from shared.checkpoints import bundle_index, model_location
from shared.errors import ModelLoadError, ProCropError
from shared.images import as_rgb


@dataclass(frozen=True)
class Prepared:
    """A photo's own model inputs, its index vector (D,), its (width, height), and the RGB photo
    only where BLIP reads it (paper profile): batches wait prepared, and a photo's pixels are
    far larger than its inputs."""

    arrays: PhotoArrays
    vector: np.ndarray
    size: tuple[int, int]
    sha256: str | None
    image: Image.Image | None = None


class CropPredictor:
    """Runs the crop model with its retrieval (and text) inputs; see the module docstring.

    `encoder`, `retrieval` and `text` may be left out where the caller brings precomputed
    features and neighbours (the crop worker); `prepare` and `crop` then refuse to run.
    """

    def __init__(
        self,
        runner: Runner,
        encoder: CompositionEncoder | None = None,
        retrieval: Retrieval | None = None,
        text: Any = None,
        batch_size: int = 16,
    ) -> None:
        self.runner, self.encoder, self.retrieval, self.text = runner, encoder, retrieval, text
        self.batch_size = batch_size
        if encoder is not None:
            if self.config.use_retrieval and retrieval is None:
                raise ValueError("this model retrieves compositions: give it a retrieval")
            if self.config.use_text and text is None:
                raise ValueError("this model reads BLIP text: give it a text embedder")

    @property
    def config(self) -> ModelConfig:
        return self.runner.config

    def crop(
        self, images: Sequence[Image.Image], hashes: Sequence[str | None], request: CropRequest
    ) -> list[CropResult]:
        """The requested crops of each photo, best first (a photo of the index never retrieves
        itself: `hashes` are the photos' sha256s, or None)."""
        out: list[CropResult] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            out += self.crop_prepared(self.prepare(images[start:end], hashes[start:end]), request)
        return out

    def prepare(
        self, images: Sequence[Image.Image], hashes: Sequence[str | None]
    ) -> list[Prepared]:
        """Step 1 for a batch: what each photo contributes on its own. Thread-safe, so callers
        can prepare the next batch while the model runs on this one."""
        if self.encoder is None:
            raise ValueError("this predictor has no composition encoder: use crop_precomputed")
        images = [as_rgb(im) for im in images]
        # The model's pixels are resized from the photo itself (training resized its working
        # copies: the same bilinear, antialiased resize, one step instead of two). Retrieval
        # vectors come from the photo itself, as the index was built (vectors of the working
        # copy cost 0.004 IoU on FCDB val). With the lite encoder its tokens are the cue maps
        # too: training took them from the working copy, but describing each photo twice costs
        # 5 ms and buys 0.001 IoU on FCDB val (0.7173 vs 0.7161).
        embedding = self.encoder.encode(images)
        features = embedding.features if embedding.features is not None else [None] * len(images)
        text = self.config.use_text
        return [
            Prepared(self._arrays(im, tokens, cells), vector, im.size, sha, im if text else None)
            for im, tokens, cells, vector, sha in zip(
                images, embedding.tokens, features, embedding.vectors, hashes, strict=True
            )
        ]

    def crop_prepared(self, prepared: Sequence[Prepared], request: CropRequest) -> list[CropResult]:
        """Steps 2-5 for prepared photos, in one model batch."""
        if not prepared:
            return []
        neighbors = self.neighbors(prepared) if self.config.use_retrieval else None
        text = None
        if self.config.use_text:
            described = self.text.describe([p.image for p in prepared]).embedding
            text = [described.tokens[i][described.mask[i]] for i in range(len(prepared))]
        arrays = [p.arrays for p in prepared]
        return self._crops(arrays, neighbors, text, [p.size for p in prepared], request)

    def crop_precomputed(
        self,
        image: Image.Image,
        tokens: np.ndarray,
        neighbors: Neighbors | None,
        text: np.ndarray | None,
        request: CropRequest,
        features: np.ndarray | None = None,
    ) -> CropResult:
        """Steps 4-5 for one photo whose composition tokens (64, T), neighbours, (L, D) text
        tokens and (64, C) encoder feature cells were computed elsewhere (the embed and retrieve
        stages of a crop job)."""
        if self.config.use_retrieval and neighbors is None:
            raise ValueError("this crop model retrieves compositions, but none were retrieved")
        if self.config.use_text and text is None:
            raise ValueError(
                "this crop model reads BLIP text: run the embed worker with PROCROP_PROFILE=paper"
            )
        arrays = [self._arrays(as_rgb(image), tokens, features)]
        found = [neighbors] if self.config.use_retrieval and neighbors is not None else None
        texts = [text] if self.config.use_text and text is not None else None
        [result] = self._crops(arrays, found, texts, [image.size], request)
        return result

    def neighbors(self, prepared: Sequence[Prepared]) -> list[Neighbors]:
        """Step 2: each prepared photo's K neighbours (never itself)."""
        if self.retrieval is None:
            raise ValueError("this predictor has no composition retrieval")
        vectors = np.stack([p.vector for p in prepared])
        return self.retrieval.neighbors(vectors, [p.sha256 for p in prepared])

    def _arrays(
        self, image: Image.Image, tokens: np.ndarray, features: np.ndarray | None = None
    ) -> PhotoArrays:
        """A photo's own model inputs; `tokens` (64, T) are its composition tokens from the
        retrieval encoder, which double as the lite backbone's cue maps when their width matches;
        `features` (64, C) are the encoder's cells, the features backbone's input."""
        if self.config.backbone == "features":
            return photo_arrays(image, self.config, features)
        cues = self.config.cue_channels
        return photo_arrays(
            image, self.config, tokens if cues and tokens.shape[-1] == cues else None
        )

    def _crops(
        self,
        arrays: Sequence[PhotoArrays],
        neighbors: Sequence[Neighbors] | None,
        text: Sequence[np.ndarray] | None,
        sizes: Sequence[tuple[int, int]],
        request: CropRequest,
    ) -> list[CropResult]:
        """One model batch -> ranked proposals -> the crops users get."""
        batch = batch_arrays(
            list(arrays),
            list(neighbors) if neighbors is not None else None,
            list(text) if text is not None else None,
        )
        scores, boxes = self.runner(batch)
        if neighbors is None or not request.transfer:  # the model's own proposals
            pairs = zip(scores, boxes, sizes, strict=True)
            return [select_crops(s, b, w, h, request) for s, b, (w, h) in pairs]
        # The retrieved crops post-process the proposals (5-fold CV in the README): the top-1
        # moves toward their median crop, and the alternatives are the proposals covering them.
        weight, cover = self.config.transfer_weight, self.config.cover_alternatives
        return [
            select_crops(s, fuse_with_transfer(s, b, nb.median_crop(), weight), w, h, request,
                         nb.samples() if cover else None)
            for s, b, nb, (w, h) in zip(scores, boxes, neighbors, sizes, strict=True)
        ]  # fmt: skip


def build_predictor(
    settings: Any,
    profile: str = "lite",
    model: str | None = None,
    collection: str | None = None,
    precomputed: bool = False,
) -> CropPredictor:
    """The predictor for `profile`: `model` (a checkpoint or bundle location), else
    PROCROP_CROP__MODEL, else (lite) the shipped bundle. Neighbours come from `collection`
    (Milvus), else PROCROP_CROP__COLLECTION, else the bundle's own index. A bundle with
    `model.onnx` runs on ONNX Runtime on a CPU unless PROCROP_CROP__RUNTIME=torch.
    `precomputed`: no encoder, retrieval or text (the crop worker gets them from its chain)."""
    location = model_location(settings, profile, model)
    crop = settings.crop
    runner = build_runner(location, crop.runtime, crop.device, settings, crop.quantized)
    if runner.config.profile != profile:
        raise ModelLoadError(f"{location} holds a {runner.config.profile!r} model, not {profile!r}")
    if precomputed:
        return CropPredictor(runner, batch_size=crop.batch_size)
    from services.embedder.registry import build_encoder

    encoder = build_encoder(settings.embedder, runner.config.encoder)
    retrieval: Retrieval | None = None
    if runner.config.use_retrieval:
        retrieval = _retrieval(settings, location, collection or crop.collection, encoder, runner)
    text = None
    if runner.config.use_text:
        from services.embedder.blip import build_blip

        text = build_blip(settings.embedder)
    return CropPredictor(runner, encoder, retrieval, text, crop.batch_size)


def _retrieval(
    settings: Any, location: str, name: str | None, encoder: CompositionEncoder, runner: Runner
) -> Retrieval:
    """Milvus collection `name`, else the bundle's own index searched in memory."""
    k, transfer_k = runner.config.k, runner.config.transfer_k
    if name is not None:
        from services.retriever.neighbors import MilvusRetrieval
        from services.retriever.search import Retriever
        from services.retriever.token_store import TokenStore
        from shared.storage import build_object_store
        from shared.vector_index import open_index

        index, store = open_index(settings), build_object_store(settings)
        return MilvusRetrieval(
            Retriever(name, encoder, index), TokenStore(store, name), k, transfer_k
        )
    path = bundle_index(location)
    if path is None:
        raise ProCropError(f"{location} has no composition index: give --collection")
    from services.retriever.neighbors import BundleRetrieval

    return BundleRetrieval(path, k, encoder.spec, transfer_k)
