"""Which index vector finds compositions whose crops transfer: kNN crop transfer alone, 5-fold CV.

The folds, photos (byte-duplicates dropped) and seed are `cv_crop_models`'. For every held-out
photo, the median expert crop of its k nearest training photos (k = 10: `procrop search`'s
default; 30: the crop model's transfer_k) is scored against its own expert crop (IoU, Disp).

Rows:
- former: the index vector before stop 21: the 32 composition tokens pooled to 4 x 4, through a
  fixed random projection to 256 (seed 7).
- shipped, fold statistics: `pretrained.search_vectors` with `fit_search_projection` fitted on
  the fold's training photos only.
- shipped file: the same vectors with the shipped statistics (fitted on all FCDB train photos:
  no labels, but the held-out photos' maps are in them).

Each row has the mean and std over folds and its per-fold difference from `former`.

    .venv/bin/python -m benchmarks.cv_search_vectors [--folds 5] [--seed 2026]

About 2 minutes on 2 CPU cores (the network runs once per photo, on ONNX Runtime).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

from benchmarks.common import FCDB, emit
from services.cropper.dataset_io import drop_repeated_files
from services.embedder.base import l2_normalize
from services.embedder.pretrained import (
    build_pretrained_encoder,
    embedding_from_features,
    fit_search_projection,
    pool_cells,
    search_vectors,
)
from shared.annotations import load_fcdb
from shared.boxes import median_box
from shared.images import decode_image, read_bytes
from shared.metrics import best_iou_and_disp


def former_vectors(tokens: np.ndarray) -> np.ndarray:
    """The pre-stop-21 index vector of (N, 64, 32) tokens."""
    pooled = pool_cells(tokens, 4)
    rng = np.random.default_rng(7)
    projection = rng.standard_normal((pooled.shape[1], 256)) / np.sqrt(256)
    return l2_normalize(l2_normalize(pooled) @ projection)


def knn_transfer(
    vectors: np.ndarray, crops: np.ndarray, train: np.ndarray, val: np.ndarray, k: int
) -> dict[str, float]:
    order = np.argsort(-(vectors[val] @ vectors[train].T), axis=1, kind="stable")[:, :k]
    scores = [
        best_iou_and_disp(median_box(crops[train[row]]), crops[i][None], 1.0, 1.0)
        for i, row in zip(val, order, strict=True)
    ]
    return {
        "iou": float(np.mean([s[0] for s in scores])),
        "disp": float(np.mean([s[1] for s in scores])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    labels = load_fcdb(FCDB / "annotations.json")
    names = drop_repeated_files(sorted(labels), FCDB)
    crops = np.asarray([labels[n].crops_norm[0] for n in names], np.float64)
    encoder = build_pretrained_encoder()
    fmaps, mids = [], []
    for start in range(0, len(names), 16):
        photos = [decode_image(read_bytes(FCDB / n), n) for n in names[start : start + 16]]
        fmap, mid = encoder.maps(photos)
        fmaps.append(fmap)
        mids.append(mid)
    fmap, mid = np.concatenate(fmaps), np.concatenate(mids)
    shipped = embedding_from_features(fmap, mid, encoder.projection)
    features = shipped.features
    folds = np.array_split(np.random.default_rng(args.seed).permutation(len(names)), args.folds)

    def fold_stats(train: np.ndarray) -> np.ndarray:
        fitted = fit_search_projection(features[train], mid[train])
        return search_vectors(features, mid, fitted)

    rows: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "former": lambda train: former_vectors(shipped.tokens),
        "shipped, fold statistics": fold_stats,
        "shipped file": lambda train: shipped.vectors,
    }
    per_fold: dict[str, dict[int, list[dict[str, float]]]] = {}
    for f in range(args.folds):
        val = np.sort(folds[f])
        train = np.sort(np.concatenate([folds[j] for j in range(args.folds) if j != f]))
        for name, make in rows.items():
            vectors = make(train)
            for k in (10, 30):
                result = knn_transfer(vectors, crops, train, val, k)
                per_fold.setdefault(name, {}).setdefault(k, []).append(result)
                print(f"{name} k={k} fold {f}: {result}", file=sys.stderr, flush=True)
    report: dict[str, dict[str, object]] = {}
    for name, by_k in per_fold.items():
        for k, scores in by_k.items():
            iou = np.array([s["iou"] for s in scores])
            former = np.array([s["iou"] for s in per_fold["former"][k]])
            report[f"{name}, k={k}"] = {
                "iou": {"mean": round(float(iou.mean()), 4), "std": round(float(iou.std()), 4)},
                "disp": round(float(np.mean([s["disp"] for s in scores])), 4),
                "paired_iou_gain_over_former": {
                    "mean": round(float((iou - former).mean()), 4),
                    "std": round(float((iou - former).std()), 4),
                    "folds": [round(float(d), 4) for d in iou - former],
                },
            }
    emit("cv_search_vectors", {"photos": len(names), "folds": args.folds, "rows": report})


if __name__ == "__main__":
    main()
