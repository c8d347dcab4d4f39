"""Zero-shot crops from CAD: the lite model trained on CAD alone (no human crop labels), scored
with benchmarks/cv_crop_models.py's protocol on FCDB train; and supervised + CAD vs supervised.

CAD comes from FCDB train photos cut to their expert crop (the "professional photos",
benchmarks/weak_professional_photos.py), placed on canvases and out-painted by the lite (OpenCV)
out-painter (`procrop cad ... --variants 1`). Folds, seed, duplicates dropped and metrics are
cv_crop_models.py's; in fold f the CAD canvases of fold f's photos are left out of training.

Rows per fold:
- zero-shot: stage 1 (views that contain each canvas's original region, labelled with it), then
  pseudo-label rounds (services/cropper/weak.py's schedule, curation and relabelled views). The
  composition index holds the fold's training canvases with their regions as crops.
- zero-shot, all items: the same on every item, the quality filter's rejects included.
- supervised: the cv row "ProCrop effnet + retrieval".
- supervised + CAD: the fold's human-labelled photos plus its CAD canvases (their regions), drawn
  with weight 1 each; the index holds the human-labelled photos, as supervised.
Diagnostics: each model's top-1 against the placed region on the held-out fold's own canvases (a
model that learnt the out-painting seam scores high there), and each round's label statistics.

    .venv/bin/python -m benchmarks.weak_zero_shot --cad runs/weak/cad-fcdb [--folds-run 0 1]

Prints one JSON line per finished (fold, row) and one JSON document at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from benchmarks.common import FCDB, emit
from benchmarks.cv_crop_models import (
    CONFIG,
    UNFUSED,
    Corpus,
    load_corpus,
    predict_variants,
    score,
)
from benchmarks.cv_crop_models import train_and_predict as supervised
from services.cropper.data import Augment, CropDataset, TrainPhoto, collate
from services.cropper.engine import train_one_epoch
from services.cropper.inputs import work_side, working_copy
from services.cropper.loss import SetCriterion
from services.cropper.model import build_model
from services.cropper.pseudo_labels import CurationConfig, curate, round_stats
from services.cropper.train import build_optimizer, load_train_config, scheduled_batches
from services.cropper.views import ViewCache, encode_views
from services.cropper.weak import predict_local, schedule
from services.cropper.weak_data import relabel_views
from services.embedder.registry import build_encoder
from services.retriever.neighbors import neighbors_from
from shared.boxes import box_iou
from shared.settings import load_settings


@dataclasses.dataclass
class Cad:
    photo: list[str]  # FCDB name each canvas was made from
    accepted: np.ndarray  # (M,) bool: passed the quality filter
    region: np.ndarray  # (M, 4) normalized xyxy
    sizes: list[tuple[int, int]]
    copies: list
    tokens: np.ndarray
    vectors: np.ndarray
    features: np.ndarray  # view 0 cells (M, 64, C)
    views: ViewCache


def load_cad(folder: Path, views: int, seed: int, model) -> Cad:
    """Every made item of the run (accepted and rejected), with its encoded views."""
    settings = load_settings()
    encoder = build_encoder(settings.embedder, "effnet")
    records = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["status"] in ("accepted", "rejected"):
            records.append(json.loads((folder / "items" / entry["item"] / "item.json").read_text()))
    copies, sizes, regions, embeds = [], [], [], []
    for start in range(0, len(records), 16):
        images = [_image(folder / r["image"]) for r in records[start : start + 16]]
        embeds.append(encoder.encode(images))
        sizes += [im.size for im in images]
        copies += [working_copy(im, work_side(model)) for im in images]
    for r in records:
        x1, y1, x2, y2 = r["crops"][0]["box"]
        regions.append([x1 / r["width"], y1 / r["height"], x2 / r["width"], y2 / r["height"]])
    region = np.asarray(regions, np.float64)
    photos = [
        TrainPhoto(r["item"], copies[i], region[i][None], np.ones(1)) for i, r in enumerate(records)
    ]
    cached = encode_views(photos, encoder, views, seed, cache_dir=settings.home / "cache")
    return Cad(
        [r["photo"] for r in records], np.array([r["status"] == "accepted" for r in records]),
        region, sizes, copies, np.concatenate([e.tokens for e in embeds]),
        np.concatenate([e.vectors for e in embeds]), np.concatenate([e.features for e in embeds]),
        cached,
    )  # fmt: skip


def _image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def neighbors(vectors_q, pool_vectors, pool_tokens, pool_crops, k, exclude=None):
    """kNN by dot product; row i never retrieves pool item exclude[i]."""
    s = vectors_q @ pool_vectors.T
    if exclude is not None:
        s[np.arange(len(s)), exclude] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return [
        neighbors_from(pool_tokens[row], [pool_crops[j].tolist() for j in row], k) for row in order
    ]


def subset_views(views: ViewCache, idx: np.ndarray) -> ViewCache:
    return dataclasses.replace(
        views, features=views.features[idx], crops=[views.crops[i] for i in idx],
        flipped=views.flipped[idx], aspect=views.aspect[idx],
    )  # fmt: skip


def concat_views(a: ViewCache, b: ViewCache) -> ViewCache:
    """a's photos then b's, b's views repeated up to a's count (the human photos keep all theirs)."""
    take = np.arange(a.count) % b.count
    return ViewCache(
        np.concatenate([a.features, b.features[:, take]]),
        [list(row) for row in a.crops] + [[row[t] for t in take] for row in b.crops],
        np.concatenate([a.flipped, b.flipped[:, take]]),
        np.concatenate([a.aspect, b.aspect[:, take]]),
    )


class Trainer:
    """The trainer's epoch loop over encoded views, with weighted draws and relabelling."""

    def __init__(self, config, photos, views, draw=None):
        self.config, self.photos, self.views = config, photos, views
        o = config.optim
        torch.manual_seed(o.seed)
        self.model = build_model(config.model)
        self.optimizer, self.criterion = build_optimizer(self.model, o), SetCriterion(config.loss)
        self.draw = draw

    def epoch(self, epoch: int) -> None:
        o = self.config.optim
        dataset = CropDataset(
            self.photos, self.config.model, Augment(), seed=o.seed, views=self.views
        )
        dataset.set_epoch(epoch)
        g = torch.Generator().manual_seed(o.seed * 1000 + epoch)
        sampler = (
            WeightedRandomSampler(self.draw.tolist(), len(dataset), generator=g)
            if self.draw is not None
            else None
        )
        loader = DataLoader(dataset, batch_size=o.batch_size, shuffle=sampler is None, sampler=sampler,
                            collate_fn=collate, drop_last=True, generator=g)  # fmt: skip
        batches = scheduled_batches(loader, self.optimizer, o, epoch)
        train_one_epoch(
            self.model, self.criterion, batches, self.optimizer, torch.device("cpu"), o.grad_clip
        )


def zero_shot(config, cad: Cad, items: np.ndarray, rounds: int, curation: CurationConfig):
    """Stage 1 + rounds on the canvases `items`; returns (trainer, per-round stats, pool)."""
    k = config.model.k
    pool = (cad.vectors[items], cad.tokens[items], cad.region[items])
    nb = neighbors(cad.vectors[items], *pool, k, exclude=np.arange(len(items)))
    photos = [
        TrainPhoto(str(i), cad.copies[i], cad.region[i][None], np.ones(1), n)
        for i, n in zip(items, nb, strict=True)
    ]
    stage1 = subset_views(cad.views, items)
    trainer = Trainer(config, photos, stage1)
    stats = {}
    for epoch, r in enumerate(schedule(config.optim.epochs, 0.2, rounds)):
        if r > len(stats):
            sizes = [cad.sizes[i] for i in items]
            cells = [cad.features[i] for i in items]
            proposals = predict_local(trainer.model, photos, sizes, 24, cells)
            labels, curated = [], []
            for j, i in enumerate(items):
                w, h = sizes[j]
                boxes, _ = curate(*proposals[str(i)], cad.region[i] * [w, h, w, h], curation)
                curated.append(boxes)
                labels.append(boxes / [w, h, w, h] if len(boxes) else cad.region[i][None])
            regions = [cad.region[i] * np.tile(cad.sizes[i], 2) for i in items]
            stats[r] = round_stats(curated, regions) | {
                "fallback_to_region": sum(len(b) == 0 for b in curated)
            }
            trainer.photos = [
                dataclasses.replace(p, crops=lab, weights=np.ones(len(lab)))
                for p, lab in zip(photos, labels, strict=True)
            ]
            trainer.views = relabel_views(stage1, list(range(len(items))), labels)
            print(json.dumps({"round": r, **stats[r]}), flush=True)
        trainer.epoch(epoch)
    return trainer, stats, pool


def seam_iou(model, cad: Cad, items: np.ndarray, pool, k: int) -> float:
    """Mean IoU of the top-1 with the placed region on canvases `items` (never trained on)."""
    nb = neighbors(cad.vectors[items], *pool, k)
    photos = [
        TrainPhoto(str(i), cad.copies[i], cad.region[i][None], np.ones(1), n)
        for i, n in zip(items, nb, strict=True)
    ]
    out = predict_local(
        model, photos, [cad.sizes[i] for i in items], 1, [cad.features[i] for i in items]
    )
    ious = [
        box_iou(out[str(i)][0][:1] / np.tile(cad.sizes[i], 2), cad.region[i][None])[0, 0]
        for i in items
    ]
    return float(np.mean(ious))


def real_scores(model, corpus: Corpus, val: np.ndarray, pool, k: int) -> dict:
    """Scores as `procrop crop` post-processes (the top-1 fused with the neighbours' median
    crop), and of the raw top-1 ("unfused_*"): a CAD-only model's neighbours are canvases, whose
    crops are their placed regions, so the fusion pulls its top-1 towards a region's size."""
    nb = neighbors(corpus.effnet.vectors[val], *pool, k)
    variants = predict_variants(model, corpus, val, nb)
    raw = score(corpus, val, variants[UNFUSED])
    return score(corpus, val, variants[""]) | {f"unfused_{m}": raw[m] for m in ("iou", "disp", "best_of_3", "top1_area")}  # fmt: skip


def run_fold(f, folds, corpus, cad, config, rows, rounds, curation):
    k, n = config.model.k, len(folds)
    val = np.sort(folds[f])
    train = np.sort(np.concatenate([folds[j] for j in range(n) if j != f]))
    train_names = {corpus.names[i] for i in train}
    in_train = np.array([p in train_names for p in cad.photo])
    val_names = {corpus.names[i] for i in val}
    held = np.flatnonzero(np.array([p in val_names for p in cad.photo]) & cad.accepted)
    out = {}
    for row in rows:
        t = time.perf_counter()
        if row.startswith("zero-shot"):
            items = np.flatnonzero(in_train & (cad.accepted | (row == "zero-shot, all items")))
            trainer, stats, pool = zero_shot(config, cad, items, rounds, curation)
            result = real_scores(trainer.model, corpus, val, pool, k)
            result |= {"seam_iou_cad_heldout": seam_iou(trainer.model, cad, held, pool, k),
                       "rounds": stats, "canvases": len(items)}  # fmt: skip
        elif row == "supervised":
            variants = supervised(corpus, train, val, config.model, config.loss, config.optim)
            result = score(corpus, val, variants[""])  # as `procrop crop` post-processes
        else:
            result = supervised_plus_cad(corpus, cad, train, val, in_train, held, config)
        result["seconds"] = round(time.perf_counter() - t, 1)
        out[row] = result
        print(json.dumps({"fold": f, "row": row, **result}), flush=True)
    return out


def supervised_plus_cad(corpus, cad, train, val, in_train, held, config):
    k = config.model.k
    pool = (corpus.effnet.vectors[train], corpus.effnet.tokens[train], corpus.crops[train])
    items = np.flatnonzero(in_train & cad.accepted)
    real_nb = neighbors(corpus.effnet.vectors[train], *pool, k, exclude=np.arange(len(train)))
    cad_nb = neighbors(cad.vectors[items], *pool, k)
    photos = [
        TrainPhoto(corpus.names[i], corpus.copies[i], corpus.crops[i][None], np.ones(1), nb)
        for i, nb in zip(train, real_nb, strict=True)
    ]
    photos += [
        TrainPhoto(str(i), cad.copies[i], cad.region[i][None], np.ones(1), nb)
        for i, nb in zip(items, cad_nb, strict=True)
    ]
    views = concat_views(subset_views(corpus.views, train), subset_views(cad.views, items))
    trainer = Trainer(config, photos, views, draw=np.ones(len(photos)))
    for epoch in range(config.optim.epochs):
        trainer.epoch(epoch)
    result = real_scores(trainer.model, corpus, val, pool, k)
    return result | {
        "seam_iou_cad_heldout": seam_iou(trainer.model, cad, held, pool, k),
        "canvases": len(items),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cad", type=Path, required=True)
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--folds-run", type=int, nargs="*", default=None, help="[default: all]")
    parser.add_argument(
        "--rows",
        nargs="*",
        default=["zero-shot", "supervised", "supervised + CAD", "zero-shot, all items"],
    )
    parser.add_argument("--cad-views", type=int, default=4, help="encoded views per canvas")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_train_config(CONFIG)
    started = time.perf_counter()
    corpus = load_corpus(args.fcdb, config.optim.views, config.optim.seed, config.model)
    cad = load_cad(args.cad, args.cad_views, config.optim.seed, config.model)
    encode_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "encoded_s": round(encode_s),
                "canvases": len(cad.photo),
                "accepted": int(cad.accepted.sum()),
            }
        ),
        flush=True,
    )
    folds = np.array_split(
        np.random.default_rng(args.seed).permutation(len(corpus.names)), args.folds
    )
    per_fold = {}
    for f in args.folds_run if args.folds_run is not None else range(args.folds):
        per_fold[f] = run_fold(
            f, folds, corpus, cad, config, args.rows, args.rounds, CurationConfig()
        )
    summary = {}
    for row in args.rows:
        done = [per_fold[f][row] for f in per_fold if row in per_fold[f]]
        summary[row] = {m: {"mean": round(float(np.mean([d[m] for d in done])), 4),
                            "std": round(float(np.std([d[m] for d in done])), 4)}
                        for m in ("iou", "disp", "best_of_3", "seam_iou_cad_heldout") if m in done[0]} | {"folds": len(done)}  # fmt: skip
    emit("weak_zero_shot", {"photos": len(corpus.names), "canvases": len(cad.photo), "accepted": int(cad.accepted.sum()),
                            "folds_run": sorted(per_fold), "epochs": config.optim.epochs, "rounds": args.rounds,
                            "cad_views": args.cad_views, "summary": summary, "per_fold": per_fold})  # fmt: skip


if __name__ == "__main__":
    main()
