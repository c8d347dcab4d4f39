"""Lite encoder ms/photo at 512 px on the long side, against SAM ViT-B's image encoder (the paper's
encoder, randomly initialised: the same arithmetic as real weights) on the same photos, one run.

    .venv/bin/python -m benchmarks.bench_lite_encoder [--photos 50] [--sam-runs 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from benchmarks.common import FCDB, emit, summary, timings_ms
from services.embedder.lite import LiteCompositionEncoder


def load_photos(n: int, long_side: int = 512) -> list[Image.Image]:
    paths = sorted(FCDB.glob("*.jpg"))[:n]
    if not paths:
        import skimage

        paths = sorted((Path(skimage.__file__).parent / "data").glob("*.png"))[:n]
    photos = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        image.thumbnail((long_side, long_side), Image.BICUBIC)
        photos.append(image)
    return photos


def bench_sam(photos: list[Image.Image], runs: int) -> dict[str, float] | None:
    if runs <= 0:
        return None
    import torch
    from segment_anything import sam_model_registry

    from services.embedder.sam import SamCompositionEncoder

    torch.manual_seed(0)
    model = sam_model_registry["vit_b"](checkpoint=None).eval()  # random weights, real arithmetic
    encoder = SamCompositionEncoder(model, variant="vit_b", version="random", batch_size=1)
    photo = photos[0]
    return summary(timings_ms(lambda: encoder.encode([photo]), repeat=runs, warmup=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--sam-runs", type=int, default=2)
    args = parser.parse_args()
    photos = load_photos(args.photos)
    encoder = LiteCompositionEncoder()
    per_photo = []
    for photo in photos:
        per_photo.extend(timings_ms(lambda p=photo: encoder.encode([p]), repeat=3, warmup=1))
    lite = summary(__import__("numpy").asarray(per_photo))
    sam = bench_sam(photos, args.sam_runs)
    result = {"photos": len(photos), "long_side_px": 512, "lite": lite, "sam_vit_b_cpu": sam}
    if sam:
        result["sam_over_lite_p50"] = round(sam["p50_ms"] / lite["p50_ms"], 1)
    emit("lite_encoder", result)


if __name__ == "__main__":
    main()
