"""Does composition retrieval carry composition? kNN crop transfer on a held-out FCDB split.

FCDB train minus a fixed validation split (200 photos, `shared.annotations.fixed_split`) is indexed
with its crops into Milvus Lite through the same code as `procrop index`; each validation photo's crop
is predicted as the per-coordinate median of its K neighbours' crops, and scored (IoU, Disp) against
its expert crop. Baselines in the same run: the median of all training crops (the prior), the whole
photo, and the centre 90% crop.

    .venv/bin/python -m benchmarks.eval_knn_transfer [--k 10] [--fcdb DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import FCDB, emit
from services.embedder.lite import LiteCompositionEncoder
from services.retriever.ingest import Ingestor
from services.retriever.search import Query, Retriever, median_crop
from services.retriever.sources import list_photos
from shared.annotations import fixed_split, load_fcdb
from shared.images import content_hash, load_image
from shared.metrics import best_iou_and_disp
from shared.settings import load_settings
from shared.storage import LocalObjectStore
from shared.vector_index import VectorIndex


def score(preds: dict[str, np.ndarray], labels: dict) -> dict[str, float]:
    """Mean IoU / Disp of normalized xyxy predictions against each photo's expert crop."""
    ious, disps = [], []
    for name, pred in preds.items():
        truth = np.asarray(labels[name].crops_norm)
        iou, disp = best_iou_and_disp(pred, truth, 1.0, 1.0)  # normalized: W = H = 1
        ious.append(iou)
        disps.append(disp)
    return {"iou": round(float(np.mean(ious)), 4), "disp": round(float(np.mean(disps)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    args = parser.parse_args()
    labels = load_fcdb(args.fcdb / "annotations.json")
    train, val = fixed_split(list(labels))
    settings = load_settings()
    with tempfile.TemporaryDirectory() as home:
        index = VectorIndex(str(Path(home) / "milvus.db"))
        encoder = LiteCompositionEncoder()
        photos = [p for p in list_photos(str(args.fcdb), settings) if p.name in set(train)]
        ingest = Ingestor("fcdb_train", encoder, index, LocalObjectStore(home), labels).run(photos)
        retriever = Retriever("fcdb_train", encoder, index)
        knn = {}
        for name in val:
            path = args.fcdb / name
            query = Query(name, content_hash(path.read_bytes()), load_image(path))
            knn[name] = median_crop(retriever.search([query], args.k)[0])
    prior = np.median([labels[n].crops_norm[0] for n in train], axis=0)
    methods = {
        "whole_photo": {n: np.array([0.0, 0.0, 1.0, 1.0]) for n in val},
        "centre_90": {n: np.array([0.05, 0.05, 0.95, 0.95]) for n in val},
        "prior_median_of_train_crops": {n: prior for n in val},
        f"knn{args.k}_median_lite": knn,
    }
    result = {
        "split": {"train": len(train), "val": len(val), "seed": 2026},
        "indexed": ingest.added,
        "k": args.k,
        "methods": {name: score(preds, labels) for name, preds in methods.items()},
    }
    emit("knn_crop_transfer_fcdb_val", result)


if __name__ == "__main__":
    main()
