"""Build the shipped files of the `effnet-lite0` composition encoder (services/embedder/weights/):

    effnet_lite0.onnx              the frozen ImageNet EfficientNet-Lite0 up to its head conv,
                                   exported from the registry package's weights, checked against torch
    effnet_lite0_pca.safetensors   over the photos of FOLDER (default FCDB train): mean and 32
                                   principal directions of its feature cells (the token projection)
                                   and the index vector's statistics (`fit_search_projection`)

    .venv/bin/python scripts/build_encoder.py [FOLDER] [--keep-onnx]

Changing either file changes the encoder's version: collections built before must be rebuilt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from services.cropper.dataset_io import drop_repeated_files
from services.embedder.pretrained import (
    ONNX_FILE,
    PCA_FILE,
    OnnxNetwork,
    export_onnx,
    fit_projection,
    fit_search_projection,
    pixels,
)
from shared.images import IMAGE_SUFFIXES, decode_image, read_bytes

ROOT = Path(__file__).resolve().parents[1]
FCDB = ROOT.parent / "shared" / "data" / "fcdb" / "train"


def main(folder: Path = FCDB, export: bool = True) -> None:
    error = export_onnx(ONNX_FILE) if export else float("nan")
    if error > 1e-3:
        raise SystemExit(f"the ONNX export differs from torch by {error:.2e}")
    # Byte-identical files (FCDB's 34 "photo unavailable" placeholders) would weigh one grey
    # picture 34 times in the principal directions: each file counts once.
    names = [p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    paths = [folder / n for n in drop_repeated_files(sorted(names), folder)]
    network = OnnxNetwork(ONNX_FILE)
    cells, sampled, mids = [], [], []
    for start in range(0, len(paths), 16):
        images = [decode_image(read_bytes(p), str(p)) for p in paths[start : start + 16]]
        fmap, mid = network(pixels(images))  # (B, 1280, 8, 8), (B, 112, 4, 4)
        cells.append(fmap.reshape(*fmap.shape[:2], -1).transpose(0, 2, 1))  # (B, 64, 1280)
        sampled.append(cells[-1].reshape(-1, fmap.shape[1])[::3])  # every third cell of a batch
        mids.append(mid)
    projection = fit_projection(np.concatenate(sampled))
    projection |= fit_search_projection(np.concatenate(cells), np.concatenate(mids))
    meta = {"photos": str(len(paths)), "source": folder.name, "onnx_max_error": f"{error:.2e}"}
    save_file(projection, str(PCA_FILE), metadata=meta)
    print(json.dumps({"onnx": str(ONNX_FILE), "projection": str(PCA_FILE), **meta}))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--keep-onnx"]
    main(Path(args[0]) if args else FCDB, export="--keep-onnx" not in sys.argv)
