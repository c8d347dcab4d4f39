"""`procrop demo`: the main job, `procrop crop`, on real sample photos that scikit-image ships."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from procrop.cropping import run_crop
from services.cropper.postprocess import CropRequest
from services.cropper.predictor import build_predictor
from shared.settings import Settings

SAMPLES = ("chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")


def sample_folder(settings: Settings) -> Path:
    """Copy the sample photos into `$PROCROP_HOME/demo/photos` (once) and return that folder."""
    import skimage

    source = Path(skimage.__file__).parent / "data"
    folder = settings.home / "demo" / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        if not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)
    return folder


def run_demo(settings: Settings, n: int = 3) -> Path:
    """Crop the samples with the shipped lite model; returns the folder of crops and overlays."""
    folder = sample_folder(settings)
    out = settings.home / "demo" / "out"
    predictor = build_predictor(settings, "lite")
    paths = [str(folder / name) for name in SAMPLES]
    run_crop(predictor, paths, CropRequest(n), False, out, settings.max_image_pixels)
    click.echo(f"crops and overlays (STEM.overlay.png) in {out}")
    return out
