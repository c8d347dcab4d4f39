"""Training views: windows that keep the crops, mirror images, neighbours, the dataset and batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from services.cropper.config import ModelConfig, profile_config
from services.cropper.data import (
    Augment,
    CropDataset,
    Sample,
    TrainPhoto,
    collate,
    random_window,
)
from services.cropper.inputs import working_copy
from services.retriever.neighbors import neighbors_from
from shared.boxes import flip_xyxy, xyxy_to_cxcywh


def coordinate_image(width: int, height: int) -> Image.Image:
    """A photo whose red and green channels are each pixel's column and row (sides <= 256)."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))


def random_crops(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 4) normalized xyxy crops of 10-60 % of each side."""
    size = rng.uniform(0.1, 0.6, (count, 2))
    corner = rng.uniform(0, 1 - size)
    return np.concatenate([corner, corner + size], 1)


def grid_tokens(k: int, channels: int = 2) -> np.ndarray:
    """(k, 64, channels) tokens whose value is 100 * neighbour + 8 * row + column."""
    values = np.arange(64, dtype=np.float32)[None] + 100 * np.arange(k, dtype=np.float32)[:, None]
    return np.repeat(values[..., None], channels, -1)


class Midpoint:
    """A stand-in generator whose `uniform(low, high)` is always the middle of the range."""

    def uniform(self, low: float, high: float) -> float:
        return (low + high) / 2


# --- random_window -------------------------------------------------------------


def test_random_window_by_hand() -> None:
    image = coordinate_image(100, 50)
    crops = np.array([[0.2, 0.3, 0.5, 0.8], [0.4, 0.2, 0.6, 0.7]])  # hull (0.2, 0.2, 0.6, 0.8)
    window, inside = random_window(image, crops, Midpoint())  # type: ignore[arg-type]
    # Window sides halfway between the photo's edges and the hull: (0.1, 0.1, 0.8, 0.9) of the
    # photo, pixels (10, 5) to (80, 45).
    assert window.size == (70, 40)
    assert np.asarray(window)[0, 0, :2].tolist() == [10, 5]
    expected = [[1 / 7, 0.25, 4 / 7, 0.875], [3 / 7, 0.125, 5 / 7, 0.75]]
    np.testing.assert_allclose(inside, expected, atol=1e-12)


def test_random_window_always_contains_the_crops() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(20, 257, 2))
        crops = random_crops(rng, int(rng.integers(1, 4)))
        window, inside = random_window(coordinate_image(w, h), crops, rng)
        x0, y0 = (int(v) for v in np.asarray(window)[0, 0, :2])  # where the window starts
        ww, wh = window.size
        # The window holds the crops' hull, up to the rounding of its sides to whole pixels.
        hull = np.concatenate([crops[:, :2].min(0), crops[:, 2:].max(0)]) * [w, h, w, h]
        assert x0 <= hull[0] + 0.5 and y0 <= hull[1] + 0.5
        assert x0 + ww >= hull[2] - 0.5 and y0 + wh >= hull[3] - 0.5
        # Re-expressed crops: the same pixels, measured from the window's corner.
        assert ((inside >= 0) & (inside <= 1)).all()
        pixels = crops * [w, h, w, h] - [x0, y0, x0, y0]
        np.testing.assert_allclose(inside * [ww, wh, ww, wh], np.clip(pixels, 0, [ww, wh] * 2))


def test_working_copy_bounds_the_long_side() -> None:
    big = working_copy(Image.new("L", (600, 300)))
    assert big.size == (256, 128) and big.mode == "RGB"
    small = Image.new("RGB", (90, 200))
    assert working_copy(small).size == (90, 200)


# --- the dataset and its batches --------------------------------------------------------------


def train_photos(config: ModelConfig, count: int = 4) -> list[TrainPhoto]:
    rng = np.random.default_rng(5)
    photos = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(40, 120, 2))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        crops = random_crops(rng, i % 2 + 1)
        has = [True, False, True][: config.k] + [True] * max(0, config.k - 3)
        neighbor_crops = [
            list(c) if keep else None
            for c, keep in zip(random_crops(rng, config.k), has, strict=True)
        ]
        tokens = rng.normal(size=(config.k, 64, config.token_dim)).astype(np.float32)
        text = rng.normal(size=(2 + i, config.text_dim)).astype(np.float32)
        photos.append(
            TrainPhoto(
                name=f"p{i}",
                image=Image.fromarray(pixels),
                crops=crops,
                weights=np.linspace(1.0, 0.5, len(crops)),
                neighbors=neighbors_from(tokens, neighbor_crops, config.k),
                text=text,
            )
        )
    return photos


def same_sample(a: Sample, b: Sample) -> bool:
    arrays = [
        (a.photo.image, b.photo.image),
        (a.targets, b.targets),
        (a.neighbors.tokens, b.neighbors.tokens),  # type: ignore[union-attr]
        (a.neighbors.crops, b.neighbors.crops),  # type: ignore[union-attr]
    ]
    return a.photo.aspect == b.photo.aspect and all(np.array_equal(x, y) for x, y in arrays)


def test_dataset_repeats_for_seed_epoch_and_index() -> None:
    config = profile_config("tiny")
    photos = train_photos(config)
    augment = Augment(window_prob=1.0, flip_prob=0.5)
    first, again = (
        CropDataset(photos, config, augment, seed=3),
        CropDataset(photos, config, augment, seed=3),
    )
    views = [first[i] for i in range(len(first))]
    assert all(same_sample(views[i], again[i]) for i in range(len(first)))
    assert all(same_sample(views[i], first[i]) for i in range(len(first)))  # order does not matter
    first.set_epoch(1)
    assert not any(same_sample(views[i], first[i]) for i in range(len(first)))
    other_seed = CropDataset(photos, config, augment, seed=4)
    assert not any(same_sample(views[i], other_seed[i]) for i in range(len(first)))
    first.set_epoch(0)
    assert all(same_sample(views[i], first[i]) for i in range(len(first)))


def test_dataset_without_augment_is_the_photo() -> None:
    config = profile_config("tiny")
    photos = train_photos(config)
    dataset = CropDataset(photos, config)
    for photo, sample in zip(photos, (dataset[i] for i in range(len(dataset))), strict=True):
        np.testing.assert_allclose(
            np.asarray(sample.targets), xyxy_to_cxcywh(photo.crops), atol=1e-6
        )
        np.testing.assert_allclose(np.asarray(sample.weights), photo.weights, atol=1e-6)
        assert np.asarray(sample.photo.image).shape == (3, 64, 64)
        assert sample.photo.cues is None  # no cue maps for a ResNet backbone
        assert sample.photo.aspect == pytest.approx(
            math.log(photo.image.width / photo.image.height)
        )
        assert sample.neighbors is photo.neighbors and sample.text is photo.text
    bare = CropDataset(photos, profile_config("tiny", use_retrieval=False, use_text=False))[0]
    assert bare.neighbors is None and bare.text is None


def test_mirrored_view_mirrors_everything() -> None:
    config = profile_config("tiny")
    photos = train_photos(config, count=2)
    plain = CropDataset(photos, config)
    mirrored = CropDataset(photos, config, Augment(window_prob=0.0, flip_prob=1.0))
    for i, photo in enumerate(photos):
        a, b = plain[i], mirrored[i]
        flipped_crops = xyxy_to_cxcywh(flip_xyxy(photo.crops))
        np.testing.assert_allclose(np.asarray(b.targets), flipped_crops, atol=1e-6)
        expected = photo.neighbors.flipped()  # type: ignore[union-attr]
        np.testing.assert_array_equal(b.neighbors.tokens, expected.tokens)  # type: ignore[union-attr]
        np.testing.assert_array_equal(b.neighbors.crops, expected.crops)  # type: ignore[union-attr]
        # Bilinear resizing commutes with mirroring, up to 8-bit rounding.
        image_a, image_b = np.asarray(a.photo.image), np.asarray(b.photo.image)
        np.testing.assert_allclose(image_b, image_a[..., ::-1], atol=0.05)
        assert b.photo.aspect == a.photo.aspect


def test_lite_samples_carry_cue_tokens() -> None:
    config = profile_config("lite", k=3, token_dim=32, text_dim=32)
    sample = CropDataset(train_photos(config, count=1), config)[0]
    assert np.asarray(sample.photo.image).shape == (3, 128, 128)
    assert np.asarray(sample.photo.cues).shape == (64, config.cue_channels)
    inputs, _, _ = collate([sample, sample])
    assert tuple(inputs.cues.shape) == (2, 64, config.cue_channels)


def test_collate_shapes_and_text_padding() -> None:
    config = profile_config("tiny")
    photos = train_photos(config, count=3)  # texts of 2, 3 and 4 tokens
    photos[0].text[1] = 0.0  # an all-zero row is padding, except the first token
    samples = [CropDataset(photos, config)[i] for i in range(3)]
    inputs, targets, weights = collate(samples)
    assert tuple(inputs.images.shape) == (3, 3, 64, 64)
    assert tuple(inputs.aspect.shape) == (3,)
    assert inputs.cues is None
    assert tuple(inputs.tokens.shape) == (3, config.k, 64, config.token_dim)
    assert tuple(inputs.boxes.shape) == (3, config.k, 4)
    assert inputs.box_mask.tolist() == [[True, False, True]] * 3
    assert tuple(inputs.text.shape) == (3, 4, config.text_dim)
    assert inputs.text_mask.tolist() == [
        [True, False, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    assert [tuple(t.shape) for t in targets] == [(1, 4), (2, 4), (1, 4)]
    assert [len(w) for w in weights] == [1, 2, 1]
    for b, photo in enumerate(photos):
        crops = photo.neighbors.crops[photo.neighbors.has_crop]  # type: ignore[union-attr]
        boxes = np.asarray(inputs.boxes[b])[photo.neighbors.has_crop]  # type: ignore[union-attr]
        np.testing.assert_allclose(boxes, xyxy_to_cxcywh(crops), atol=1e-6)
        np.testing.assert_allclose(np.asarray(inputs.text[b, : len(photo.text)]), photo.text)  # type: ignore[arg-type]


def test_collate_of_a_batch_equals_collate_of_each_photo() -> None:
    config = profile_config("tiny")
    samples = [CropDataset(train_photos(config, count=3), config)[i] for i in range(3)]
    batch, _, _ = collate(samples)
    for b, sample in enumerate(samples):
        single, _, _ = collate([sample])
        for name in ("images", "aspect", "tokens", "boxes", "box_mask"):
            np.testing.assert_array_equal(
                np.asarray(getattr(single, name))[0], np.asarray(getattr(batch, name))[b]
            )
        length = single.text.shape[1]
        np.testing.assert_array_equal(
            np.asarray(single.text)[0], np.asarray(batch.text)[b, :length]
        )
        assert not np.asarray(batch.text_mask)[b, length:].any()
