"""Composition encoders by name: `lite` (weight-free, the default) or `sam` (segment-anything)."""

from __future__ import annotations

from services.embedder.base import CompositionEncoder
from services.embedder.lite import LiteCompositionEncoder
from shared.errors import ProCropError
from shared.settings import EmbedderSettings

ENCODERS = ("lite", "sam")


def build_encoder(settings: EmbedderSettings, name: str | None = None) -> CompositionEncoder:
    """The encoder `name` (default: `settings.encoder`), configured from `settings`."""
    name = name or settings.encoder
    if name == "lite":
        return LiteCompositionEncoder()
    if name == "sam":
        from services.embedder.sam import build_sam_encoder  # torch only when SAM is asked for

        return build_sam_encoder(settings)
    raise ProCropError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODERS)}")
