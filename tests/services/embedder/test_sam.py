"""SAM composition encoder on a tiny seeded SAM, loaded from a `.pth` file like real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError

from services.embedder.base import Embedding
from services.embedder.sam import (
    POOLING,
    SamCompositionEncoder,
    build_sam_encoder,
    file_digest,
    pool_valid_region,
)
from shared.errors import ModelLoadError, SettingsError
from shared.settings import EmbedderSettings


@pytest.fixture(scope="module")
def encoder(tiny_sam_checkpoint: Path) -> SamCompositionEncoder:
    """Batches of 2, so the 3 test photos take a full and a partial batch."""
    return SamCompositionEncoder.from_checkpoint(
        "vit_tiny", tiny_sam_checkpoint, device="cpu", batch_size=2
    )


@pytest.fixture(scope="module")
def batched(encoder: SamCompositionEncoder, photos: list[Image.Image]) -> Embedding:
    return encoder.encode(photos)


@pytest.fixture(scope="module")
def singles(encoder: SamCompositionEncoder, photos: list[Image.Image]) -> list[Embedding]:
    return [encoder.encode([photo]) for photo in photos]


def test_shapes_dtypes_and_unit_vectors(batched: Embedding) -> None:
    assert batched.tokens.shape == (3, 64, 256)
    assert batched.vectors.shape == (3, 256)
    assert batched.tokens.dtype == batched.vectors.dtype == np.float32
    assert np.isfinite(batched.tokens).all()
    np.testing.assert_allclose(np.linalg.norm(batched.vectors, axis=1), 1.0, atol=1e-5)


def test_batched_equals_one_by_one_for_wide_tall_and_square(
    batched: Embedding, singles: list[Embedding]
) -> None:
    for row, single in enumerate(singles):
        np.testing.assert_allclose(single.tokens[0], batched.tokens[row], atol=1e-5)
        np.testing.assert_allclose(single.vectors[0], batched.vectors[row], atol=1e-5)


def test_same_photo_gives_identical_embedding(
    encoder: SamCompositionEncoder, photos: list[Image.Image], singles: list[Embedding]
) -> None:
    again = encoder.encode([photos[1]])
    np.testing.assert_array_equal(again.tokens, singles[1].tokens)
    np.testing.assert_array_equal(again.vectors, singles[1].vectors)


def test_different_photos_give_different_tokens(batched: Embedding) -> None:
    assert not np.allclose(batched.tokens[0], batched.tokens[1], atol=1e-3)


def test_empty_batch(encoder: SamCompositionEncoder) -> None:
    empty = encoder.encode([])
    assert empty.tokens.shape == (0, 64, 256)
    assert empty.vectors.shape == (0, 256)


def test_grayscale_photo_is_encoded_as_rgb(
    encoder: SamCompositionEncoder, photos: list[Image.Image]
) -> None:
    gray = photos[2].convert("L")
    expected = encoder.encode([gray.convert("RGB")])
    np.testing.assert_array_equal(encoder.encode([gray]).tokens, expected.tokens)


def test_pooling_ignores_the_padded_cells() -> None:
    torch.manual_seed(0)
    embedding = torch.randn(2, 4, 64, 64)
    cells = [(43, 64), (64, 26)]  # a wide and a tall photo in the top-left corner
    polluted = embedding.clone()
    polluted[0, :, 43:, :] = 1e6
    polluted[1, :, :, 26:] = -1e6
    np.testing.assert_array_equal(
        pool_valid_region(polluted, cells).numpy(), pool_valid_region(embedding, cells).numpy()
    )


def test_pooling_of_a_full_grid_is_row_major_8x8_average() -> None:
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    embedding = torch.stack([rows, cols])[None]  # (1, 2, 64, 64): each cell holds its position
    tokens = pool_valid_region(embedding, [(64, 64)])  # (1, 64, 2)
    assert tokens.shape == (1, 64, 2)
    t = torch.arange(64)
    torch.testing.assert_close(tokens[0, :, 0], 8.0 * (t // 8) + 3.5)  # block row centre
    torch.testing.assert_close(tokens[0, :, 1], 8.0 * (t % 8) + 3.5)  # block column centre
    full = F.adaptive_avg_pool2d(embedding, 8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, full)


def test_spec_names_variant_and_weights(
    encoder: SamCompositionEncoder, tiny_sam_checkpoint: Path, tmp_path: Path
) -> None:
    assert encoder.spec == {
        "encoder": "sam-vit_tiny",
        "encoder_version": f"{POOLING}-{file_digest(tiny_sam_checkpoint)}",
        "token_dim": 256,
        "vector_dim": 256,
    }
    other = tmp_path / "other.pth"
    weights = bytearray(tiny_sam_checkpoint.read_bytes())
    weights[len(weights) // 2] ^= 1  # flip one bit
    other.write_bytes(weights)
    assert file_digest(other) != file_digest(tiny_sam_checkpoint)


def test_missing_checkpoint_is_a_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelLoadError, match=r"not found: .*nope\.pth"):
        SamCompositionEncoder.from_checkpoint("vit_tiny", missing, device="cpu")


def test_checkpoint_of_another_variant_is_a_model_load_error(tiny_sam_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not fit variant 'vit_b'"):
        SamCompositionEncoder.from_checkpoint("vit_b", tiny_sam_checkpoint, device="cpu")


def test_corrupt_checkpoint_is_a_model_load_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="unreadable SAM checkpoint"):
        SamCompositionEncoder.from_checkpoint("vit_tiny", corrupt, device="cpu")


def test_unknown_variant_is_a_model_load_error(tiny_sam_checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown SAM variant 'vit_x'"):
        SamCompositionEncoder.from_checkpoint("vit_x", tiny_sam_checkpoint)


def test_factory_reads_settings(tiny_sam_checkpoint: Path) -> None:
    # model_construct: the tiny variant is deliberately not a valid setting
    settings = EmbedderSettings.model_construct(
        sam_variant="vit_tiny", sam_checkpoint=str(tiny_sam_checkpoint), device="cpu", batch_size=5
    )
    encoder = build_sam_encoder(settings)
    assert (encoder.name, encoder.batch_size, encoder.device.type) == ("sam-vit_tiny", 5, "cpu")


def test_factory_without_checkpoint_names_the_variable() -> None:
    with pytest.raises(ModelLoadError, match="PROCROP_EMBEDDER__SAM_CHECKPOINT"):
        build_sam_encoder(EmbedderSettings(encoder="sam"))


def test_factory_with_bad_device_names_the_variable(tiny_sam_checkpoint: Path) -> None:
    with pytest.raises(ValidationError, match="device"):  # refused when settings are read
        EmbedderSettings(sam_checkpoint=str(tiny_sam_checkpoint), device="gpu0")
    # Settings built without validation meet the factory's own check.
    settings = EmbedderSettings.model_construct(
        sam_checkpoint=str(tiny_sam_checkpoint), device="gpu0"
    )
    with pytest.raises(SettingsError, match="PROCROP_EMBEDDER__DEVICE"):
        build_sam_encoder(settings)
