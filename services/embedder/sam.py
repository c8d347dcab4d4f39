"""The paper's composition encoder: SAM's image encoder, pooled to an 8 x 8 grid of tokens.

A photo is resized so its long side is 1024 px, normalized and zero-padded to 1024 x 1024 exactly as
`segment_anything.SamPredictor.set_image` does; the ViT turns it into a (256, 64, 64) embedding (one
cell per 16 x 16 px patch). Only the cells that cover the photo (not the padding) are average-pooled
to 8 x 8, so a wide and a tall photo both spread their 64 tokens over their own content.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import ImageEncoderViT, Sam
from segment_anything.utils.transforms import ResizeLongestSide

from services.embedder.base import (
    GRID,
    CompositionEncoder,
    Embedding,
    file_sha256,
    tokens_to_vector,
)
from shared.devices import resolve_device
from shared.errors import ModelLoadError, SettingsError
from shared.settings import EmbedderSettings

logger = logging.getLogger(__name__)

POOLING = "valid-avg8"  # part of `version`: change it when the pooling of the embedding changes


def _build_sam_vit_tiny(checkpoint: str | None = None) -> Sam:
    """A tiny SAM (ViT 32-d, 2 windowed blocks) for tests and smoke runs; same 1024 px input.

    No global-attention block: over 64 x 64 cells it would cost more than the rest of the model.
    """
    return _build_sam(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=[],
        checkpoint=checkpoint,
    )


# Variant name -> builder of a `Sam` with random weights: segment-anything's own registry plus a
# tiny variant. `load_sam` calls them with `checkpoint=None` and loads the weights itself.
SAM_BUILDERS: dict[str, Callable[..., Sam]] = {
    **sam_model_registry,
    "vit_tiny": _build_sam_vit_tiny,
}


def load_sam(variant: str, checkpoint: str | Path, device: str | torch.device = "auto") -> Sam:
    """Build SAM `variant` and load its weights from a local `.pth` state dict, in eval mode.

    We load the state dict ourselves rather than through the builder's `checkpoint=` argument so
    that GPU-saved files open on a CPU host (`map_location`), nothing but tensors is unpickled
    (`weights_only`), and every failure becomes a one-line `ModelLoadError` naming the file.

    Raises:
        ModelLoadError: unknown variant, missing or unreadable file, or weights of another shape.
    """
    if variant not in SAM_BUILDERS:
        raise ModelLoadError(
            f"unknown SAM variant {variant!r}; expected one of {sorted(SAM_BUILDERS)}"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"SAM checkpoint not found: {path}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, EOF, runtime)
        raise ModelLoadError(f"unreadable SAM checkpoint {path}: {exc}") from None
    sam = SAM_BUILDERS[variant](checkpoint=None)
    misfit = _state_dict_misfit(sam, state_dict)
    if misfit:
        raise ModelLoadError(f"SAM checkpoint {path} does not fit variant {variant!r}: {misfit}")
    sam.load_state_dict(state_dict)
    return sam.to(resolve_device(device)).eval()


def _state_dict_misfit(model: torch.nn.Module, state_dict: object) -> str | None:
    """What keeps `state_dict` from loading strictly into `model`, in one line; None if it fits."""
    if not isinstance(state_dict, dict):
        return f"expected a state dict, got {type(state_dict).__name__}"
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    reshaped = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state_dict.keys())
        if getattr(state_dict[key], "shape", None) != expected[key].shape
    ]
    if not (missing or unexpected or reshaped):
        return None
    example = (reshaped or missing or unexpected)[0]
    return (
        f"{len(missing)} tensors missing, {len(unexpected)} unexpected, "
        f"{len(reshaped)} of another shape (e.g. {example})"
    )


def file_digest(path: str | Path, length: int = 12) -> str:
    """First `length` hex digits of the file's SHA-256 (identifies the weights in `version`)."""
    return file_sha256(path)[:length]


def pool_valid_region(
    embedding: torch.Tensor, valid_cells: Sequence[tuple[int, int]], grid: int = GRID
) -> torch.Tensor:
    """Average-pool each embedding over its unpadded cells only, to a `grid` x `grid` token grid.

    Args:
        embedding: (B, C, H', W') float image embeddings; the photo fills the top-left corner.
        valid_cells: per image, (rows, columns) of cells that cover the photo (>= 1 each).
    Returns:
        (B, grid * grid, C) tokens, row-major: token t is grid cell (t // grid, t % grid).
    """
    pooled = [
        F.adaptive_avg_pool2d(emb[:, :rows, :cols], grid)  # (C, grid, grid)
        for emb, (rows, cols) in zip(embedding, valid_cells, strict=True)
    ]
    return torch.stack(pooled).flatten(2).transpose(1, 2)  # (B, grid*grid, C)


class SamCompositionEncoder(CompositionEncoder):
    """Composition tokens from SAM's image encoder: (B, 64, 256) tokens and (B, 256) index vectors.

    It keeps only what embedding a photo needs, the ViT image encoder and the pixel normalization;
    the prompt encoder and mask decoder are dropped.
    """

    token_dim = 256

    def __init__(self, sam: Sam, *, variant: str, version: str, batch_size: int = 8) -> None:
        """Wrap a loaded `sam` (on any device) as `sam-<variant>`; `version` names its weights."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = f"sam-{variant}"
        self.version = version
        self.batch_size = batch_size
        self.image_encoder: ImageEncoderViT = sam.image_encoder.eval()
        self.pixel_mean = sam.pixel_mean  # (3, 1, 1) float, 0-255 scale
        self.pixel_std = sam.pixel_std
        self.img_size = self.image_encoder.img_size  # 1024: the square the ViT sees
        self.transform = ResizeLongestSide(self.img_size)

    @classmethod
    def from_checkpoint(
        cls,
        variant: str,
        checkpoint: str | Path,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 8,
    ) -> SamCompositionEncoder:
        """Load `variant` from a local `.pth` file (see `load_sam`); version: pooling + digest."""
        sam = load_sam(variant, checkpoint, device)
        version = f"{POOLING}-{file_digest(Path(checkpoint).expanduser())}"
        logger.info("loaded SAM %s from %s (version %s)", variant, checkpoint, version)
        return cls(sam, variant=variant, version=version, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _encode(self, images: Sequence[Image.Image]) -> Embedding:
        """Encode in batches of `batch_size`: tokens (B, 64, 256), vectors (B, 256), float32."""
        tokens = np.concatenate(
            [
                self._encode_batch(images[start : start + self.batch_size])
                for start in range(0, len(images), self.batch_size)
            ]
        )
        return Embedding(tokens=tokens, vectors=tokens_to_vector(tokens))

    @torch.inference_mode()
    def _encode_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 64, 256) float32 tokens of one batch."""
        inputs, sizes = zip(*(self._preprocess(image) for image in images), strict=True)
        embedding = self.image_encoder(torch.stack(inputs))  # (B, 256, 64, 64)
        patch = self.img_size // embedding.shape[-1]  # 16 px per embedding cell
        cells = [(math.ceil(h / patch), math.ceil(w / patch)) for h, w in sizes]
        return pool_valid_region(embedding, cells).float().cpu().numpy()

    def _preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """SAM's preprocessing: long side to 1024, normalize, pad bottom/right to 1024 x 1024.

        Returns:
            (3, 1024, 1024) float32 on `device`, and the resized photo's (height, width) in pixels.
        """
        rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        resized = self.transform.apply_image(rgb)  # (h, w, 3) uint8, max(h, w) = 1024
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float()  # (3, h, w)
        x = (x - self.pixel_mean) / self.pixel_std
        height, width = x.shape[-2:]
        x = F.pad(x, (0, self.img_size - width, 0, self.img_size - height))  # (3, 1024, 1024)
        return x, (height, width)


def build_sam_encoder(settings: EmbedderSettings) -> SamCompositionEncoder:
    """The SAM encoder that `settings` describe (sam_variant, sam_checkpoint, device, batch_size).

    Raises:
        ModelLoadError: no checkpoint configured, or it cannot be loaded.
        SettingsError: `device` is not a torch device.
    """
    if settings.sam_checkpoint is None:
        raise ModelLoadError(
            "no SAM checkpoint configured: "
            "set PROCROP_EMBEDDER__SAM_CHECKPOINT to a local .pth file"
        )
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise SettingsError(f"PROCROP_EMBEDDER__DEVICE: {exc}") from None
    return SamCompositionEncoder.from_checkpoint(
        settings.sam_variant,
        settings.sam_checkpoint,
        device=device,
        batch_size=settings.batch_size,
    )
