"""FCDB train photos cut to their expert crop: the "professional photos" a zero-shot CAD run starts
from (benchmarks/weak_zero_shot.py). Photos whose file bytes repeat (FCDB's placeholders) are left out.

    .venv/bin/python -m benchmarks.weak_professional_photos OUT_FOLDER

Writes OUT_FOLDER/{name} (JPEG, quality 95) and prints a JSON count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import FCDB, emit
from services.cropper.dataset_io import drop_repeated_files
from shared.annotations import load_fcdb
from shared.images import decode_image, read_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    args = parser.parse_args()
    labels = load_fcdb(args.fcdb / "annotations.json")
    names = drop_repeated_files(sorted(labels), args.fcdb)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = args.out / name
        if target.is_file():
            continue
        photo = decode_image(read_bytes(args.fcdb / name), name)
        x1, y1, x2, y2 = labels[name].crops_norm[0]
        w, h = photo.size
        box = (round(x1 * w), round(y1 * h), round(x2 * w), round(y2 * h))
        photo.convert("RGB").crop(box).save(target, "JPEG", quality=95)
    emit("weak_professional_photos", {"photos": len(names), "out": str(args.out)})


if __name__ == "__main__":
    main()
