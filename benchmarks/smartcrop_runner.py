"""smartcrop.py over photos, one JSON line per photo, shaped like `procrop crop --json`.

    .venv/bin/python benchmarks/smartcrop_runner.py PHOTO...

The child process that `benchmarks.bench_crop_speed` times. Each photo is decoded as procrop and
smartcrop's own CLI decode it (EXIF orientation applied, RGB), then cropped with smartcrop's
documented call, `SmartCrop().crop(image, 100, 100)` (README "Usage"): a 1:1 crop as large as
the photo allows (smartcrop searches scales 1.0 and 0.9 of the shorter side), analysed on a copy
prescaled to about 111 px on the short side, the box given back in original pixels. Output line:
{"image", "width", "height", "crops": [{"box": [x1, y1, x2, y2], "score", "aspect_ratio": "1:1"}]}.
Imports only PIL and smartcrop, so start-up is the library's own.
"""

from __future__ import annotations

import json
import sys

from PIL import Image, ImageOps

try:
    import smartcrop
except ImportError:  # pragma: no cover - the benchmark checks this first
    sys.exit(
        "smartcrop_runner: smartcrop is not installed (.venv/bin/pip install smartcrop==0.5.0)"
    )

REQUEST = (100, 100)  # the README's example: the crop's ratio (1:1); the output size is not used


def crop_one(cropper: smartcrop.SmartCrop, path: str) -> dict:
    with Image.open(path) as image:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # as `shared.images.decode_image`
        image = image.convert("RGB") if image.mode != "RGB" else image
    top = cropper.crop(image, *REQUEST)["top_crop"]
    box = [top["x"], top["y"], top["x"] + top["width"], top["y"] + top["height"]]
    return {
        "image": path,
        "width": image.width,
        "height": image.height,
        "crops": [{"box": box, "score": round(float(top["score"]), 6), "aspect_ratio": "1:1"}],
    }


def main(paths: list[str]) -> int:
    cropper = smartcrop.SmartCrop()
    for path in paths:
        print(json.dumps(crop_one(cropper, path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
