"""SAM multi-scale masks on the tiny seeded SAM, loaded from a `.pth` file like real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.embedder.sam_masks import (
    SamMaskMaker,
    level_shares,
    load_sam_mask_maker,
    paint_segments,
)
from shared.errors import ModelLoadError
from shared.settings import CadSettings, EmbedderSettings


def _square(size: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y1:y2, x1:x2] = True
    return mask


def test_smaller_segments_lie_on_top_and_labels_follow_visible_area() -> None:
    big = _square(20, 0, 0, 20, 20)  # 400 px: the whole map
    small = _square(20, 2, 2, 6, 6)  # 16 px, inside `big`
    middle = _square(20, 10, 0, 20, 12)  # 120 px, inside `big`
    labels = paint_segments([small, big, middle], min_area=1)
    assert labels.dtype == np.uint16 and labels.shape == (20, 20)
    assert (labels[small] == 3).all() and (labels[middle] == 2).all()  # on top, by area
    assert (labels[big & ~small & ~middle] == 1).all()
    assert np.bincount(labels.ravel()).tolist() == [0, 400 - 16 - 120, 120, 16]


def test_segments_under_the_level_area_are_left_out() -> None:
    masks = [_square(20, 0, 0, 10, 10), _square(20, 12, 12, 14, 14)]  # 100 px and 4 px
    labels = paint_segments(masks, min_area=50)
    assert labels.max() == 1 and (labels == 1).sum() == 100
    assert (paint_segments(masks, min_area=1000) == 0).all()


def test_level_areas_go_from_coarse_to_fine() -> None:
    assert level_shares(1) == [1 / 1024]
    shares = level_shares(3)
    assert shares[0] == pytest.approx(1 / 16) and shares[-1] == pytest.approx(1 / 1024)
    assert shares == sorted(shares, reverse=True)


def _settings(checkpoint: Path | None) -> tuple[EmbedderSettings, CadSettings]:
    embedder = EmbedderSettings(
        sam_variant="vit_tiny",
        sam_checkpoint=None if checkpoint is None else str(checkpoint),
        device="cpu",
    )
    return embedder, CadSettings(masks="sam", mask_scales=2)


@pytest.fixture(scope="module")
def loaded(tiny_sam_checkpoint: Path) -> SamMaskMaker:
    return load_sam_mask_maker(*_settings(tiny_sam_checkpoint))


@pytest.fixture(scope="module")
def maker(loaded: SamMaskMaker) -> SamMaskMaker:
    """The loaded SAM with a 2 x 2 prompt grid and no quality filter: random weights give masks
    no real threshold would keep, and the mask decoder costs about a second per few points."""
    sam = loaded.generator.predictor.model
    return SamMaskMaker(
        sam, version="tiny", points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0
    )


@pytest.fixture(scope="module")
def wide_masks(maker: SamMaskMaker, photos: list[Image.Image]) -> np.ndarray:
    return maker.masks(photos[0])


def test_loaded_from_the_settings_with_the_weights_digest(
    loaded: SamMaskMaker, tiny_sam_checkpoint: Path
) -> None:
    assert loaded.name == "sam"
    assert loaded.version.startswith("sam-vit_tiny-") and "-grid32-levels2" in loaded.version
    assert len(loaded.shares) == 2


def test_label_maps_at_the_photo_size_numbered_by_area(
    wide_masks: np.ndarray, photos: list[Image.Image]
) -> None:
    assert wide_masks.shape == (2, 200, 300) and wide_masks.dtype == np.uint16
    assert wide_masks[-1].max() >= 1  # the finest level keeps every mask SAM returned
    for labels in wide_masks:
        counts = np.bincount(labels.ravel())[1:]
        assert (counts > 0).all() and (np.diff(counts) <= 0).all()


def test_same_photo_same_masks(
    maker: SamMaskMaker, wide_masks: np.ndarray, photos: list[Image.Image]
) -> None:
    np.testing.assert_array_equal(maker.masks(photos[0]), wide_masks)


def test_photos_over_sams_input_size_come_back_at_their_own_size(
    maker: SamMaskMaker, photos: list[Image.Image]
) -> None:
    big = photos[0].resize((1500, 1000), Image.Resampling.BILINEAR)
    masks = maker.masks(big)
    assert masks.shape == (2, 1000, 1500) and masks.dtype == np.uint16
    assert masks[-1].max() >= 1


def test_missing_checkpoint_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="PROCROP_EMBEDDER__SAM_CHECKPOINT"):
        load_sam_mask_maker(*_settings(None))
    with pytest.raises(ModelLoadError, match="SAM checkpoint not found"):
        load_sam_mask_maker(*_settings(tmp_path / "none.pth"))
