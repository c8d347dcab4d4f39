"""Tiny seeded SAM and BLIP models, saved to a temp folder like real weights, and test photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from services.embedder.sam import SAM_BUILDERS

TINY_WORDS = [
    *("a", "an", "the", "photo", "photography", "of", "man", "woman", "dog", "cat"),
    *("on", "in", "at", "beach", "street", "sky", "sea", "left", "right"),
]
# BERT-style special tokens first (ids 0-4), BLIP's [DEC] (caption start) and [ENC] last
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS, "[DEC]", "[ENC]"]


def make_photo(height: int, width: int, seed: int) -> Image.Image:
    """An RGB photo with some layout (a bright disc on a gradient) plus seeded noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.2, 0.8, 2) * (height, width)
    disc = ((rows - cy) ** 2 + (cols - cx) ** 2) < (0.2 * min(height, width)) ** 2
    base = np.stack([rows / height, cols / width, 0.5 + 0 * rows], axis=-1) * 160
    pixels = base + 80 * disc[..., None] + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Three photos: wide (3:2 landscape), tall (2:5 portrait) and square."""
    return [make_photo(200, 300, 0), make_photo(250, 100, 1), make_photo(128, 128, 2)]


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `.pth` state dict of the seeded "vit_tiny" SAM, as real SAM checkpoints are stored."""
    torch.manual_seed(0)
    sam = SAM_BUILDERS["vit_tiny"]()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path


def _tiny_blip_config(vocab_size: int, image_size: int = 32) -> BlipConfig:
    """Two-layer, 32-wide BLIP with token ids matching `TINY_VOCAB`."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": TINY_VOCAB.index("[PAD]"),
        "sep_token_id": TINY_VOCAB.index("[SEP]"),  # ends a caption
        "eos_token_id": TINY_VOCAB.index("[SEP]"),
        "bos_token_id": TINY_VOCAB.index("[DEC]"),  # starts a caption
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 16,
        "initializer_range": 0.02,  # the default 1e-10 makes every photo look the same
    }
    return BlipConfig(
        text_config=text, vision_config=vision, image_text_hidden_size=16, projection_dim=16
    )


def _tiny_blip_processor(folder: Path, image_size: int = 32) -> BlipProcessor:
    """A BERT word-piece tokenizer over `TINY_VOCAB` and a BLIP image processor at `image_size`."""
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_VOCAB) + "\n")
    tokenizer = BertTokenizer(
        vocab=str(vocab_file), bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_blip_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded tiny BLIP captioner ("caption") and image-text model ("itm"), each in a folder
    written by `save_pretrained` with its processor, as on the hub."""
    root = tmp_path_factory.mktemp("blip")
    processor = _tiny_blip_processor(root)
    config = _tiny_blip_config(len(TINY_VOCAB))
    folders = {}
    for seed, (kind, model_class) in enumerate(
        [("caption", BlipForConditionalGeneration), ("itm", BlipForImageTextRetrieval)]
    ):
        torch.manual_seed(seed)
        folders[kind] = root / kind
        model_class(config).save_pretrained(folders[kind])
        processor.save_pretrained(folders[kind])
    return folders
