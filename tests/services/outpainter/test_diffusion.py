"""The ControlNet out-painter on tiny seeded SD-1.5-shaped models, saved and loaded back through
`load_controlnet_outpainter` exactly as real weights are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.outpainter.base import Canvas
from services.outpainter.diffusion import (
    ControlNetOutpainter,
    load_controlnet_outpainter,
    segment_colours,
    work_size,
)
from shared.errors import ModelLoadError
from shared.settings import CadSettings
from tests.tiny_diffusion import build_tiny_sd15


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_sd15(tmp_path_factory.mktemp("sd15"))


def _settings(folders: dict[str, Path], seg: bool) -> CadSettings:
    return CadSettings(
        outpainter="controlnet",
        base_model=str(folders["base"]),
        controlnet_inpaint=str(folders["inpaint"]),
        controlnet_seg=str(folders["seg"]) if seg else None,
        steps=2,
        work_side=64,
        batch_size=2,
        device="cpu",
    )


@pytest.fixture(scope="module", params=[False, True], ids=["inpaint", "inpaint+seg"])
def outpainter(
    request: pytest.FixtureRequest, model_folders: dict[str, Path]
) -> ControlNetOutpainter:
    return load_controlnet_outpainter(_settings(model_folders, seg=request.param))


def _canvas(size: tuple[int, int], box: tuple[int, int, int, int], seed: int) -> Canvas:
    """A grey canvas with a noisy photo at pixel `box` (x1, y1, x2, y2)."""
    width, height = size
    x1, y1, x2, y2 = box
    pixels = np.full((height, width, 3), 128, np.uint8)
    rng = np.random.default_rng(seed)
    pixels[y1:y2, x1:x2] = rng.integers(0, 256, (y2 - y1, x2 - x1, 3), dtype=np.uint8)
    known = np.zeros((height, width), bool)
    known[y1:y2, x1:x2] = True
    region = (x1 / width, y1 / height, x2 / width, y2 / height)
    return Canvas(image=Image.fromarray(pixels), known=known, region=region)


def _controls(canvas: Canvas) -> np.ndarray:
    """(2, H, W) label maps: the photo as one segment (coarse), then its halves (fine)."""
    known = canvas.known
    coarse = known.astype(np.uint16)
    fine = coarse.copy()
    cols = np.nonzero(known.any(0))[0]
    fine[:, cols[len(cols) // 2] :] *= 2
    return np.stack([coarse, fine])


CANVASES = [_canvas((96, 80), (20, 16, 70, 60), 0), _canvas((96, 80), (10, 30, 50, 70), 1)]
PROMPTS = ["a photo of the sea", "a wide view of the beach"]


def _outpaint(outpainter: ControlNetOutpainter, seeds: list[int]) -> list[np.ndarray]:
    images = outpainter.outpaint(CANVASES, PROMPTS, [_controls(c) for c in CANVASES], seeds)
    return [np.asarray(image) for image in images]


@pytest.fixture(scope="module")
def filled(outpainter: ControlNetOutpainter) -> list[np.ndarray]:
    return _outpaint(outpainter, [7, 8])


def test_loaded_through_the_settings_with_versioned_weights(
    outpainter: ControlNetOutpainter, model_folders: dict[str, Path]
) -> None:
    parts = outpainter.version.split(";")
    assert [p.split(":")[0] for p in parts[:2]] == ["base", "inpaint"]
    assert all(len(p.split(":")[1]) == 12 for p in parts[:-1])  # weight digests
    assert parts[-1] == "float32"
    assert len(parts) == (4 if outpainter.uses_seg else 3)


def test_outputs_have_canvas_size_and_keep_known_pixels_exactly(
    filled: list[np.ndarray],
) -> None:
    for canvas, image in zip(CANVASES, filled, strict=True):
        assert image.shape == (80, 96, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image[canvas.known], np.asarray(canvas.image)[canvas.known])
        assert (image[~canvas.known] != 128).any()  # the grey was painted over


def test_same_seed_same_fill_different_seed_different_fill(
    outpainter: ControlNetOutpainter, filled: list[np.ndarray]
) -> None:
    again = _outpaint(outpainter, [7, 8])
    for first, second in zip(filled, again, strict=True):
        np.testing.assert_array_equal(first, second)
    other = _outpaint(outpainter, [9, 8])
    assert not np.array_equal(other[0], filled[0])


def test_a_fill_does_not_depend_on_its_batch(
    outpainter: ControlNetOutpainter, filled: list[np.ndarray]
) -> None:
    alone = outpainter.outpaint(CANVASES[1:], PROMPTS[1:], [_controls(CANVASES[1])], [8])
    diff = np.abs(np.asarray(alone[0]).astype(int) - filled[1].astype(int))
    assert diff.max() <= 2  # batched convolutions round differently, by a grey level or two


def test_canvases_of_different_sizes_share_a_call() -> None:
    assert work_size((96, 80), 64) == (64, 56)
    assert work_size((1024, 700), 512) == (512, 352)
    assert work_size((700, 1024), 512) == (352, 512)


def test_segment_colours_are_fixed_and_black_outside() -> None:
    labels = np.array([[0, 1], [2, 1]], np.uint16)
    colours = segment_colours(labels)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert (colours[0, 0] == 0).all() and (colours[0, 1] == colours[1, 1]).all()
    assert (colours[0, 1] != colours[1, 0]).any()
    np.testing.assert_array_equal(segment_colours(labels), colours)


def test_mismatched_inputs_fail_naming_the_argument(outpainter: ControlNetOutpainter) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        outpainter.outpaint(CANVASES, PROMPTS[:1], [_controls(c) for c in CANVASES], [1, 2])
    with pytest.raises(ValueError, match=r"controls\[0\]"):
        outpainter.outpaint(CANVASES[:1], PROMPTS[:1], [np.zeros((2, 8, 8), np.uint16)], [1])


def test_missing_folder_is_a_one_line_model_load_error(
    model_folders: dict[str, Path], tmp_path: Path
) -> None:
    settings = _settings(model_folders, seg=True)
    with pytest.raises(ModelLoadError, match="seg ControlNet folder not found") as caught:
        load_controlnet_outpainter(settings.model_copy(update={"controlnet_seg": "/no/such"}))
    assert "\n" not in str(caught.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"cannot load inpaint ControlNet from .*broken"):
        load_controlnet_outpainter(settings.model_copy(update={"controlnet_inpaint": str(broken)}))
