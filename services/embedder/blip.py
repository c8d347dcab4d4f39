"""The paper's text branch: a BLIP caption of a photo, then BLIP's image-grounded text embedding M.

Two transformers models, each loaded from a hub id or a local folder by `load_blip`:

- a captioner (`BlipForConditionalGeneration`, e.g. Salesforce/blip-image-captioning-base) writes
  what is in the photo;
- an image-text model (`BlipForImageTextRetrieval`, e.g. Salesforce/blip-itm-base-coco) reads the
  caption with cross-attention to the photo's ViT features: the output token sequence of this text
  encoder (the ITM path, before the ITM head) is the multimodal embedding M, (L, D) per photo.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from PIL import Image
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    PreTrainedModel,
)

from shared.devices import resolve_device
from shared.errors import ModelLoadError, SettingsError
from shared.model_sources import load_local_first, resolve_source
from shared.settings import EmbedderSettings

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=PreTrainedModel)

ENC_TOKEN = "[ENC]"  # BLIP's marker for image-grounded encoding, used where the tokenizer has it


@dataclass(frozen=True)
class MultimodalEmbedding:
    """BLIP image-grounded text features of B (photo, text) pairs.

    tokens: (B, L, D) float32, one row per text token, zero where `mask` is False (padding).
    mask:   (B, L) bool, True on real tokens; position 0 ([CLS] / [ENC]) is always real.
    """

    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def cls(self) -> np.ndarray:
        """(B, D) float32: the first token, BLIP's summary of the pair (what the ITM head reads)."""
        return self.tokens[:, 0]

    def mean(self) -> np.ndarray:
        """(B, D) float32: average over real tokens only."""
        weights = self.mask[..., None].astype(np.float32)  # (B, L, 1)
        return (self.tokens * weights).sum(1) / np.maximum(weights.sum(1), 1.0)


@dataclass(frozen=True)
class Description:
    """What BLIP says about B photos: captions and the multimodal embedding of each caption."""

    captions: list[str]
    embedding: MultimodalEmbedding


def load_blip(
    model_class: type[ModelT], name_or_path: str | Path, device: str | torch.device = "auto"
) -> tuple[ModelT, BlipProcessor]:
    """Load a BLIP model and its processor from a local folder or a hub id, in eval mode, float32.

    An existing folder is read without network; a path-like argument that is not a folder fails at
    once. A hub id is read from the local hub cache, else downloaded (offline, with
    `HF_HUB_OFFLINE` unset, huggingface_hub retries for minutes before it gives up).

    Raises:
        ModelLoadError: nothing to load, or the weights do not fill every tensor of `model_class`.
    """
    source, local = resolve_source(name_or_path, "BLIP model")
    model, processor, info = load_local_first(
        lambda offline: _read_pretrained(model_class, source, local_files_only=offline),
        source,
        local,
        "BLIP model",
    )
    # transformers fills missing or mis-shaped tensors with random values and only warns
    misfits = sorted(str(key) for key in (*info["missing_keys"], *info["mismatched_keys"]))
    if misfits:
        raise ModelLoadError(
            f"BLIP weights in {source} do not fit {model_class.__name__}: "
            f"{len(misfits)} tensors missing or mis-shaped, e.g. {misfits[0]}"
        )
    logger.info("loaded %s from %s", model_class.__name__, source)
    module: torch.nn.Module = model  # transformers' typed wrapper of `to` confuses type checkers
    module.to(resolve_device(device)).eval()  # in place
    return model, processor


def _read_pretrained(
    model_class: type[ModelT], source: str, local_files_only: bool
) -> tuple[ModelT, BlipProcessor, dict[str, Any]]:
    """`from_pretrained` of the processor and the model; also returns transformers' loading info."""
    processor = BlipProcessor.from_pretrained(source, local_files_only=local_files_only)
    loaded = model_class.from_pretrained(
        source, local_files_only=local_files_only, dtype=torch.float32, output_loading_info=True
    )
    model, info = cast(tuple[ModelT, dict[str, Any]], loaded)  # with output_loading_info
    return model, processor, info


class BlipCaptioner:
    """Writes what is in each photo with a BLIP captioning model (beam search, deterministic)."""

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        processor: BlipProcessor,
        *,
        batch_size: int = 8,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 3,
    ) -> None:
        """Wrap a loaded captioner (see `load_blip`).

        Args:
            prompt: text the caption continues (e.g. "a photography of"); kept in the caption.
            max_new_tokens, num_beams: caption length cap and beam width.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor = model, processor
        self.batch_size = batch_size
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per photo, in order; a `prompt`, if set, starts every caption."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions += self._caption_batch(images[start : start + self.batch_size])
        return captions

    @torch.inference_mode()
    def _caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        device = self.model.device
        text = None if self.prompt is None else [self.prompt] * len(images)  # one per photo
        inputs = self.processor(images=list(images), text=text, return_tensors="pt")
        output_ids = self.model.generate(
            **inputs.to(device),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
        )  # (B, T) token ids
        texts = self.processor.batch_decode(output_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]


class BlipTextEmbedder:
    """Captions photos with BLIP; embeds (photo, text) pairs with BLIP's image-grounded encoder."""

    def __init__(
        self,
        captioner: BlipForConditionalGeneration,
        caption_processor: BlipProcessor,
        matcher: BlipForImageTextRetrieval,
        match_processor: BlipProcessor,
        *,
        batch_size: int = 8,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 3,
        max_text_tokens: int = 40,
    ) -> None:
        """Wrap loaded models (see `load_blip`).

        Args:
            prompt: text the caption continues (e.g. "a photography of"); kept in the caption.
            max_new_tokens, num_beams: caption length cap and beam width (deterministic search).
            max_text_tokens: texts are truncated to this many tokens before embedding.
        """
        self.captioning = BlipCaptioner(
            captioner,
            caption_processor,
            batch_size=batch_size,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
        )
        self.captioner, self.caption_processor = captioner, caption_processor
        self.matcher, self.match_processor = matcher, match_processor
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens

    @property
    def embed_dim(self) -> int:
        """D, the width of the multimodal tokens (768 for BLIP base)."""
        return int(self.matcher.text_encoder.config.hidden_size)

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per photo, in order (see `BlipCaptioner.caption`)."""
        return self.captioning.caption(images)

    def multimodal_embedding(
        self, images: Sequence[Image.Image], texts: Sequence[str]
    ) -> MultimodalEmbedding:
        """BLIP's image-grounded text encoding of each (photo, text) pair: M, (B, L, D) float32.

        Texts are tokenized together (padded to the longest, L tokens), then encoded in batches.
        """
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts")
        if not images:
            return MultimodalEmbedding(
                np.zeros((0, 1, self.embed_dim), np.float32), np.ones((0, 1), bool)
            )
        input_ids, attention_mask = self._tokenize(texts)  # (B, L) each
        tokens = np.concatenate(
            [
                self._embed_batch(
                    images[start : start + self.batch_size],
                    input_ids[start : start + self.batch_size],
                    attention_mask[start : start + self.batch_size],
                )
                for start in range(0, len(images), self.batch_size)
            ]
        )
        mask = attention_mask.bool().numpy()
        return MultimodalEmbedding(tokens=tokens * mask[..., None], mask=mask)

    def _tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) input ids, first token [ENC] when the tokenizer has it, and (B, L) attention mask.

        BLIP's multimodal feature mode marks image-grounded text with [ENC] in place of [CLS];
        hub tokenizers that lack the token keep [CLS], as transformers' ITM forward does.
        """
        tokenizer = self.match_processor.tokenizer
        encoded = tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"].clone()
        enc_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
        if enc_id is not None and enc_id != tokenizer.unk_token_id:
            input_ids[:, 0] = enc_id
        return input_ids, encoded["attention_mask"]

    @torch.inference_mode()
    def _embed_batch(
        self, images: Sequence[Image.Image], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> np.ndarray:
        """(B, L, D) float32 text-encoder states with cross-attention to the photos' ViT states."""
        device = self.matcher.device
        pixels = self.match_processor.image_processor(images=list(images), return_tensors="pt")
        image_embeds = self.matcher.vision_model(
            pixel_values=pixels["pixel_values"].to(device)
        ).last_hidden_state  # (B, 1 + patches, Dv)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        states = self.matcher.text_encoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # (B, L, D)
        return states.float().cpu().numpy()

    def describe(self, images: Sequence[Image.Image]) -> Description:
        """Caption each photo, then embed the photo with its own caption."""
        captions = self.caption(images)
        return Description(captions, self.multimodal_embedding(images, captions))


def build_blip(settings: EmbedderSettings) -> BlipTextEmbedder:
    """The BLIP text branch that `settings` describe (blip_caption_model, blip_model, device, ...).

    Raises:
        ModelLoadError: a model cannot be loaded.
        SettingsError: `device` is not a torch device.
    """
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise SettingsError(f"PROCROP_EMBEDDER__DEVICE: {exc}") from None
    captioner, caption_processor = load_blip(
        BlipForConditionalGeneration, settings.blip_caption_model, device
    )
    matcher, match_processor = load_blip(BlipForImageTextRetrieval, settings.blip_model, device)
    return BlipTextEmbedder(
        captioner, caption_processor, matcher, match_processor, batch_size=settings.batch_size
    )
