"""Crop quality on the FCDB validation split, every method in one run (the issue's table).

Rows: whole photo, centre 90%, kNN crop transfer (median of the K neighbours' crops, from the
shipped bundle's index), the lite model trained without retrieval (the paper's ablation), and the
shipped lite model exactly as `procrop crop` runs it. Every row goes through `procrop.evaluation`
(the code behind `procrop eval`); the val photos are never in the index or in training.

    .venv/bin/python -m benchmarks.eval_crop_models [--ablation runs/lite-noret/best]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import FCDB, emit
from procrop.evaluation import evaluate
from services.cropper.predictor import build_predictor
from shared.annotations import fixed_split, load_fcdb
from shared.checkpoints import shipped_bundle
from shared.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    parser.add_argument("--model", default=str(shipped_bundle()))
    parser.add_argument(
        "--ablation", default="runs/lite-noret/best", help="model without retrieval"
    )
    args = parser.parse_args()
    labels = load_fcdb(args.fcdb / "annotations.json")
    _, val = fixed_split(sorted(labels))
    settings = load_settings()
    rows = evaluate(
        build_predictor(settings, "lite", args.model), labels, args.fcdb, val, baselines=True
    )
    rows["lite model with retrieval (shipped)"] = rows.pop("ProCrop")
    if Path(args.ablation, "config.json").is_file():
        ablation = evaluate(
            build_predictor(settings, "lite", args.ablation), labels, args.fcdb, val
        )
        rows["lite model without retrieval"] = ablation["ProCrop"]
    table = {name: {k: round(v, 4) for k, v in row.items()} for name, row in rows.items()}
    emit("crop_quality_fcdb_val", {"split": {"val": len(val), "seed": 2026}, "methods": table})


if __name__ == "__main__":
    main()
