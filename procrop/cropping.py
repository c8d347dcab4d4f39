"""`procrop crop`: the main job. Photos in, ranked crops out (text, JSON lines, crop files, overlay).

Photos are read and decoded on a small thread pool while the model works on the previous batch;
a photo that cannot be read is reported on stderr and the others go on (exit status 1 at the end).
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
from PIL import Image, ImageDraw, ImageFont
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from services.cropper.postprocess import CropRequest, CropResult
from services.cropper.predictor import CropPredictor, Prepared
from shared.errors import InvalidImageError
from shared.images import content_hash, decode_image, read_bytes

PREPARE_THREADS = 2  # threads reading and preparing batches while the model runs
PREFETCH = 3  # batches in flight
DECODED_AT_ONCE = 2  # photos a reading thread holds decoded (the encoder's run size)
OVERLAY_COLOURS = ("#ff3b30", "#ffcc00", "#34c759", "#0a84ff", "#af52de", "#ff9500")


@dataclass(frozen=True)
class Photo:
    """A photo read and prepared. Its file's bytes, not its pixels, are kept for the outputs:
    batches in flight held 4 x 16 decoded photos, 1.9 GB for 48 photos of 12 MP."""

    path: str
    sha256: str
    data: bytes

    def image(self, max_pixels: int) -> Image.Image:
        return decode_image(self.data, self.path, max_pixels)


def read_photos(
    paths: Sequence[str], max_pixels: int
) -> tuple[list[Photo], list[Image.Image], list[str]]:
    """Photos read, their decoded images, and an error message for each photo that failed."""
    photos: list[Photo] = []
    images: list[Image.Image] = []
    errors: list[str] = []
    for path in paths:
        try:
            data = read_bytes(path)
            images.append(decode_image(data, path, max_pixels))
            photos.append(Photo(path, content_hash(data), data))
        except InvalidImageError as exc:
            errors.append(str(exc))
    return photos, images, errors


def prepared_batches(
    predictor: CropPredictor, paths: Sequence[str], max_pixels: int
) -> Iterator[tuple[list[Photo], list[str], list[Prepared]]]:
    """Batches of (photos, errors, prepared inputs); the next batch is read and prepared on a
    worker thread while the caller runs the model on this one (two cores, both busy)."""

    def load(chunk: Sequence[str]) -> tuple[list[Photo], list[str], list[Prepared]]:
        # A few photos decoded at a time, each group prepared before the next is decoded: a
        # batch of 16 decoded 12 MP photos is 0.6 GB, and two batches are read at once.
        photos: list[Photo] = []
        errors: list[str] = []
        prepared: list[Prepared] = []
        for start in range(0, len(chunk), DECODED_AT_ONCE):
            got, images, failed = read_photos(chunk[start : start + DECODED_AT_ONCE], max_pixels)
            photos += got
            errors += failed
            if got:
                prepared += predictor.prepare(images, [p.sha256 for p in got])
        return photos, errors, prepared

    size = predictor.batch_size
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    # One BLAS thread: numpy's matrix products here are small (the encoder's projections),
    # and OpenBLAS's idle threads spin after each, taking the cores from ONNX Runtime: with them
    # 100 photos cost 40-43 CPU-ms each instead of 33-36 (benchmarks.bench_crop_speed).
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(PREPARE_THREADS) as pool:
        pending = deque(pool.submit(load, chunk) for chunk in chunks[:PREFETCH])
        for i in range(len(chunks)):
            batch = pending.popleft().result()  # done batches are dropped: memory stays flat
            if i + PREFETCH < len(chunks):
                pending.append(pool.submit(load, chunks[i + PREFETCH]))
            yield batch


def run_crop(
    predictor: CropPredictor,
    paths: Sequence[str],
    request: CropRequest,
    as_json: bool,
    out: Path | None,
    max_pixels: int,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Crop every photo; returns the number of photos that failed."""
    failed = 0
    for photos, errors, prepared in prepared_batches(predictor, paths, max_pixels):
        for error in errors:
            tqdm.write(f"procrop: skipped {error}", file=sys.stderr)  # on its own line, bar or not
        failed += len(errors)
        for photo, result in zip(photos, predictor.crop_prepared(prepared, request), strict=True):
            click.echo(format_result(photo.path, result, as_json))
            if out is not None:
                write_outputs(photo.path, photo.image(max_pixels), result, out)
        if on_progress:
            on_progress(len(photos) + len(errors))
    return failed


def format_result(path: str, result: CropResult, as_json: bool) -> str:
    if as_json:
        return json.dumps({"image": path, **result.to_dict()})
    lines = [f"{path} ({result.width}x{result.height})"]
    for rank, crop in enumerate(result.crops, 1):
        ratio = f"  {crop.aspect_ratio}" if crop.aspect_ratio else ""
        lines.append(f"  {rank}. {crop.score:.3f}  {' '.join(map(str, crop.box))}{ratio}")
    return "\n".join(lines)


def write_outputs(path: str, image: Image.Image, result: CropResult, out: Path) -> None:
    """`STEM.crop1.jpg`... (best first) and `STEM.overlay.png` in `out`, STEM being `path`'s."""
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem
    for rank, crop in enumerate(result.crops, 1):
        image.crop(crop.box).save(out / f"{stem}.crop{rank}.jpg", quality=92)
    overlay(image, result).save(out / f"{stem}.overlay.png")


def overlay(image: Image.Image, result: CropResult) -> Image.Image:
    """The photo with its ranked crops drawn on it, best last (on top), labelled rank and score."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    font_size = max(12, round(max(canvas.size) / 40))
    font = ImageFont.load_default(size=font_size)
    for rank in range(len(result.crops), 0, -1):
        crop = result.crops[rank - 1]
        colour = OVERLAY_COLOURS[(rank - 1) % len(OVERLAY_COLOURS)]
        draw.rectangle(crop.box, outline=colour, width=width if rank > 1 else 2 * width)
        label = f"#{rank} {crop.score:.2f}" + (f" {crop.aspect_ratio}" if crop.aspect_ratio else "")
        # Labels step down by rank, so crops with nearby corners keep readable labels.
        x, y = crop.box[0] + 2 * width, crop.box[1] + 2 * width + (rank - 1) * font_size
        draw.text((x, y), label, fill=colour, font=font, stroke_width=2, stroke_fill="black")
    return canvas
