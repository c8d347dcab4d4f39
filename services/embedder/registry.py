"""Composition encoders by name: `lite` (weight-free), `effnet` (ImageNet EfficientNet-Lite0 cells,
the shipped lite model's) or `sam` (segment-anything, the paper's)."""

from __future__ import annotations

from services.embedder.base import CompositionEncoder
from services.embedder.lite import LiteCompositionEncoder
from shared.errors import ProCropError
from shared.settings import EmbedderSettings

ENCODERS = ("lite", "effnet", "sam")


def build_encoder(settings: EmbedderSettings, name: str | None = None) -> CompositionEncoder:
    """The encoder `name` (default: `settings.encoder`), configured from `settings`."""
    name = name or settings.encoder
    if name == "lite":
        return LiteCompositionEncoder()
    if name == "effnet":
        from services.embedder.pretrained import build_pretrained_encoder

        return build_pretrained_encoder(
            settings.runtime, settings.device, max(settings.batch_size, 16)
        )
    if name == "sam":
        from services.embedder.sam import build_sam_encoder  # torch only when SAM is asked for

        return build_sam_encoder(settings)
    raise ProCropError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODERS)}")
