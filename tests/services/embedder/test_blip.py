"""BLIP captions and multimodal embeddings on tiny seeded models saved with `save_pretrained`."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from services.embedder.blip import BlipTextEmbedder, MultimodalEmbedding, build_blip, load_blip
from shared.errors import ModelLoadError
from shared.settings import EmbedderSettings

TEXTS = ["a dog on the beach", "a man", "the cat in the street at left"]


@pytest.fixture(scope="module")
def blip(tiny_blip_folders: dict[str, Path]) -> BlipTextEmbedder:
    """Loaded by the settings factory; batches of 2 (3 photos: a full and a partial batch)."""
    settings = EmbedderSettings(
        blip_caption_model=str(tiny_blip_folders["caption"]),
        blip_model=str(tiny_blip_folders["itm"]),
        device="cpu",
        batch_size=2,
    )
    return build_blip(settings)


@pytest.fixture(scope="module")
def captions(blip: BlipTextEmbedder, photos: list[Image.Image]) -> list[str]:
    return blip.caption(photos)


@pytest.fixture(scope="module")
def embedding(blip: BlipTextEmbedder, photos: list[Image.Image]) -> MultimodalEmbedding:
    return blip.multimodal_embedding(photos, TEXTS)


def test_captions_are_strings_one_per_photo(captions: list[str]) -> None:
    assert len(captions) == 3
    assert all(isinstance(caption, str) and caption for caption in captions)


def test_captions_batched_equal_one_by_one(
    blip: BlipTextEmbedder, photos: list[Image.Image], captions: list[str]
) -> None:
    assert captions == [blip.caption([photo])[0] for photo in photos]


def test_prompted_captions_continue_the_prompt(
    tiny_blip_folders: dict[str, Path], blip: BlipTextEmbedder, photos: list[Image.Image]
) -> None:
    captioner, processor = load_blip(
        BlipForConditionalGeneration, tiny_blip_folders["caption"], "cpu"
    )
    prompted = BlipTextEmbedder(
        captioner,
        processor,
        blip.matcher,
        blip.match_processor,
        prompt="a photography of",
        max_new_tokens=4,
        num_beams=1,
    )
    captions = prompted.caption(photos)
    assert len(captions) == 3
    assert all(caption.startswith("a photography of") for caption in captions)


def test_embedding_shapes_mask_and_padding(embedding: MultimodalEmbedding) -> None:
    batch, length, dim = embedding.tokens.shape
    assert (batch, dim) == (3, 32)
    assert embedding.tokens.dtype == np.float32
    assert embedding.mask.shape == (3, length) and embedding.mask.dtype == bool
    # [ENC] + words + [SEP]; the longest text sets L, the others are padded
    assert embedding.mask.sum(1).tolist() == [7, 4, 9] and length == 9
    assert (embedding.tokens[~embedding.mask] == 0).all()
    assert embedding.cls.shape == embedding.mean().shape == (3, 32)


def test_embedding_is_deterministic(
    blip: BlipTextEmbedder, photos: list[Image.Image], embedding: MultimodalEmbedding
) -> None:
    again = blip.multimodal_embedding(photos, TEXTS)
    np.testing.assert_array_equal(again.tokens, embedding.tokens)


def test_embedding_batched_equals_one_by_one(
    blip: BlipTextEmbedder, photos: list[Image.Image], embedding: MultimodalEmbedding
) -> None:
    for row, (photo, text) in enumerate(zip(photos, TEXTS, strict=True)):
        single = blip.multimodal_embedding([photo], [text])
        valid = embedding.mask[row]
        assert single.mask[0].sum() == valid.sum()
        np.testing.assert_allclose(single.tokens[0], embedding.tokens[row, valid], atol=1e-5)
        np.testing.assert_allclose(single.mean()[0], embedding.mean()[row], atol=1e-5)


def test_embedding_is_grounded_in_the_photo(
    blip: BlipTextEmbedder, photos: list[Image.Image]
) -> None:
    same_text = blip.multimodal_embedding(photos[:2], ["a dog", "a dog"])
    assert not np.allclose(same_text.cls[0], same_text.cls[1], atol=1e-4)


def test_describe_embeds_each_photo_with_its_caption(
    blip: BlipTextEmbedder, photos: list[Image.Image], captions: list[str]
) -> None:
    description = blip.describe(photos)
    assert description.captions == captions
    expected = blip.multimodal_embedding(photos, description.captions)
    np.testing.assert_allclose(description.embedding.tokens, expected.tokens, atol=1e-6)


def test_images_and_texts_must_pair_up(blip: BlipTextEmbedder, photos: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        blip.multimodal_embedding(photos, TEXTS[:2])


def test_missing_folder_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"folder not found: .*no-blip"):
        load_blip(BlipForImageTextRetrieval, str(tmp_path / "no-blip"), "cpu")


def test_empty_folder_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load BLIP model from {tmp_path}:")):
        load_blip(BlipForImageTextRetrieval, tmp_path, "cpu")


def test_weights_of_another_model_are_a_model_load_error(
    tiny_blip_folders: dict[str, Path],
) -> None:
    with pytest.raises(ModelLoadError, match="do not fit BlipForImageTextRetrieval"):
        load_blip(BlipForImageTextRetrieval, tiny_blip_folders["caption"], "cpu")


def test_uncached_hub_id_offline_is_a_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # offline mode makes huggingface_hub fail at once instead of retrying for minutes
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot load BLIP model from procrop-tests/no-model"):
        load_blip(BlipForImageTextRetrieval, "procrop-tests/no-model", "cpu")
