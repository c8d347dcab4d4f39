"""Test photos with layout; the tiny SAM and BLIP models are in tests/conftest.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


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
