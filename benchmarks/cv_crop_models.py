"""Model selection that generalises: 5-fold cross-validation over all of FCDB train.

Photos whose file bytes occur more than once (FCDB's "photo unavailable" placeholders) are dropped;
the rest are split into 5 folds by a fixed seed. In each fold, the composition index holds the
other four folds only (a photo never retrieves itself or any photo of its own fold), and every
candidate is scored on the held-out fold: top-1 IoU and Disp against the expert crop, best-of-3
IoU (the paper's N = 3 column), the mean pairwise IoU of the top 3 crops (how different the
alternatives are) and the median top-1 area. Rows are the mean and standard deviation over folds.

Rows: the prior (median training crop); kNN-10 crop transfer over the weight-free lite descriptor
and over the pretrained `effnet` encoder; the ProCrop model on the effnet features backbone
without retrieval and with it (the paper's ablation). Both models train with `configs/lite.toml`'s
settings through the trainer's own dataset, views, loss, optimizer and schedule. The model with
retrieval is post-processed as `procrop crop` does (its top-1 averaged with the median crop of the
30 nearest compositions, the alternatives the proposals that best cover those 30 crops), and scored
again on the same proposals with variants of that post-processing (`predict_variants`), with the
per-fold paired difference (`paired_*_gain`: variant minus shipped).

    .venv/bin/python -m benchmarks.cv_crop_models [--epochs 30] [--folds 5] [--only ROW ...]

Prints one JSON document. Wall time on 2 CPU cores: about 3 minutes of encoding (cached under
$PROCROP_HOME/cache), then a few minutes of training per fold and model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import FCDB, emit
from services.cropper.config import LossConfig, ModelConfig
from services.cropper.data import Augment, CropDataset, TrainPhoto, collate
from services.cropper.dataset_io import drop_repeated_files
from services.cropper.engine import predict, train_one_epoch
from services.cropper.inputs import work_side, working_copy
from services.cropper.loss import SetCriterion
from services.cropper.model import build_model
from services.cropper.postprocess import (
    CropRequest,
    fuse_with_transfer,
    select_crops,
)
from services.cropper.train import (
    OptimConfig,
    build_optimizer,
    load_train_config,
    scheduled_batches,
)
from services.cropper.views import ViewCache, encode_views
from services.embedder.base import Embedding
from services.embedder.lite import LiteCompositionEncoder
from services.embedder.pretrained import pool_cells
from services.embedder.registry import build_encoder
from services.retriever.neighbors import Neighbors, neighbors_from
from shared.annotations import load_fcdb
from shared.boxes import box_iou, flip_xyxy, median_box
from shared.images import decode_image, read_bytes
from shared.metrics import best_iou_and_disp
from shared.settings import load_settings

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lite.toml"
TOP = CropRequest(3)
NMS_07_TOP = dataclasses.replace(TOP, nms_iou=0.7)
UNFUSED = ", top-1 not fused with the kNN median"
NMS_07 = ", alternatives by NMS at 0.7"
FLIP = ", top-1 averaged with the mirrored pass's (cell-flip TTA)"
RIDGE = ", top-1 fused with a ridge regression's box too"
NARROW = ", top-1 fused with the median crop of the model's K neighbours (not transfer_k)"
NEXT_BEST = ", alternatives: the next best scored (not covering the neighbours' crops)"
MERGED = ", top-1: the score-weighted mean of the best proposal and those above IoU 0.7 with it (4 at most)"
TOP4 = ", top-1: the score-weighted mean of the 4 best-scored proposals"
W75 = ", top-1 fused with weight 0.75 on the kNN median (shipped: 0.5)"
W100 = ", top-1: the kNN median alone (weight 1.0)"
Ranked = list[np.ndarray] | dict[str, list[np.ndarray]]  # a row's crops, or its variants' crops


@dataclasses.dataclass
class Corpus:
    names: list[str]
    crops: np.ndarray  # (N, 4) normalized xyxy expert crops
    sizes: list[tuple[int, int]]
    copies: list  # working copies (PIL)
    effnet: Embedding  # of the original photos, as `procrop crop` sees them
    lite_vectors: np.ndarray
    views: ViewCache


def load_corpus(fcdb: Path, views: int, seed: int, model: ModelConfig) -> Corpus:
    settings = load_settings()
    labels = load_fcdb(fcdb / "annotations.json")
    names = drop_repeated_files(sorted(labels), fcdb)
    encoder, lite = build_encoder(settings.embedder, "effnet"), LiteCompositionEncoder()
    copies, sizes, embeddings, lite_vectors = [], [], [], []
    for start in range(0, len(names), 16):
        photos = [decode_image(read_bytes(fcdb / n), n) for n in names[start : start + 16]]
        embeddings.append(encoder.encode(photos))
        lite_vectors.append(lite.encode(photos).vectors)
        sizes += [p.size for p in photos]
        copies += [working_copy(p, work_side(model)) for p in photos]
    crops = np.asarray([labels[n].crops_norm[0] for n in names], np.float64)
    effnet = Embedding(
        np.concatenate([e.tokens for e in embeddings]),
        np.concatenate([e.vectors for e in embeddings]),
        np.concatenate([e.features for e in embeddings]),  # type: ignore[misc]
    )
    photos = [_photo(n, copies[i], crops[i]) for i, n in enumerate(names)]
    cached = encode_views(photos, encoder, views, seed, cache_dir=settings.home / "cache")
    return Corpus(names, crops, sizes, copies, effnet, np.concatenate(lite_vectors), cached)


def _photo(name: str, image, crop: np.ndarray, neighbors: Neighbors | None = None) -> TrainPhoto:
    return TrainPhoto(name, image, crop[None], np.ones(1), neighbors)


def knn(vectors: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices into `pool` of each query's nearest photos (never the query itself)."""
    scores = vectors[queries] @ vectors[pool].T
    scores[queries[:, None] == pool[None]] = -np.inf
    return pool[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def score(corpus: Corpus, val: np.ndarray, top: list[np.ndarray]) -> dict[str, float]:
    """Metrics of ranked normalized xyxy crops (<= 3 each) of the photos `val`."""
    ious, disps, best3, pairwise, areas = [], [], [], [], []
    for i, boxes in zip(val, top, strict=True):
        truth = corpus.crops[i][None]
        iou, disp = best_iou_and_disp(boxes[0], truth, 1.0, 1.0)
        ious.append(iou)
        disps.append(disp)
        best3.append(float(box_iou(boxes[:3], truth).max()))
        areas.append(float((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1])))
        if len(boxes) >= 3:
            m = box_iou(boxes[:3], boxes[:3])
            pairwise.append(float(m[np.triu_indices(3, 1)].mean()))
    return {
        "iou": float(np.mean(ious)), "disp": float(np.mean(disps)),
        "best_of_3": float(np.mean(best3)), "top3_pairwise_iou": float(np.mean(pairwise)) if pairwise else 1.0,
        "top1_area": float(np.median(areas)),
    }  # fmt: skip


def fold_neighbors(
    corpus: Corpus, photos: np.ndarray, pool: np.ndarray, k: int, transfer_k: int = 0
) -> list[Neighbors]:
    """Each photo's k nearest in `pool`, with the median crop of its `transfer_k` nearest."""
    found = knn(corpus.effnet.vectors, photos, pool, max(k, transfer_k))
    return [
        neighbors_from(
            corpus.effnet.tokens[row[:k]], [corpus.crops[j].tolist() for j in row], k, transfer_k
        )
        for row in found
    ]


def train_and_predict(
    corpus: Corpus, train: np.ndarray, val: np.ndarray, model_cfg: ModelConfig,
    loss: LossConfig, optim: OptimConfig, build: Callable[[ModelConfig], Any] = build_model,
) -> dict[str, list[np.ndarray]]:  # fmt: skip
    """Train on the fold's photos (their encoded views), then rank crops of the held-out photos
    (by variant: see `predict_variants`). `build` makes the untrained model."""
    torch.manual_seed(optim.seed)
    retrieval = model_cfg.use_retrieval
    k = model_cfg.k
    train_nb = fold_neighbors(corpus, train, train, k) if retrieval else [None] * len(train)
    photos = [
        _photo(corpus.names[i], corpus.copies[i], corpus.crops[i], nb)
        for i, nb in zip(train, train_nb, strict=True)
    ]
    views = dataclasses.replace(
        corpus.views,
        features=corpus.views.features[train],
        crops=[corpus.views.crops[i] for i in train],
        flipped=corpus.views.flipped[train],
        aspect=corpus.views.aspect[train],
    )
    dataset = CropDataset(photos, model_cfg, Augment(), seed=optim.seed, views=views)
    loader = DataLoader(
        dataset, batch_size=optim.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
        generator=torch.Generator().manual_seed(optim.seed),
    )  # fmt: skip
    model = build(model_cfg)
    optimizer, criterion = build_optimizer(model, optim), SetCriterion(loss)
    for epoch in range(optim.epochs):
        dataset.set_epoch(epoch)
        batches = scheduled_batches(loader, optimizer, optim, epoch)
        train_one_epoch(model, criterion, batches, optimizer, torch.device("cpu"), optim.grad_clip)
    if not retrieval:
        return predict_variants(model, corpus, val, None)
    neighbors = fold_neighbors(corpus, val, train, k, model_cfg.transfer_k)
    return predict_variants(model, corpus, val, neighbors, ridge_boxes(corpus, train, val))


def pooled_pca_vectors(features: np.ndarray, dim: int = 256) -> np.ndarray:
    """(N, dim) unit search vectors: the 4 x 4-pooled cells, centred, on their `dim` principal
    directions (fitted on all photos, labels unused, as the shipped token projection is)."""
    x = pool_cells(features, 4).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v = x @ vt[:dim].T
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def ridge_boxes(corpus: Corpus, train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """(V, 4) crops of the held-out photos by ridge regression from the 4 x 4 pooled encoder
    cells to the expert crop, its penalty chosen by exact leave-one-out error on the training
    photos alone (kernel form: there are more features than photos)."""
    x = pool_cells(corpus.effnet.features[train], 4).astype(np.float64)
    mean_x, mean_y = x.mean(0), corpus.crops[train].mean(0)
    x, y = x - mean_x, corpus.crops[train] - mean_y
    s, u = np.linalg.eigh(x @ x.T)
    keep = s > 1e-6 * s.max()  # centring leaves one null direction: the free intercept
    s, u = s[keep], u[:, keep]
    uy = u.T @ y

    def coefficients(alpha: float) -> np.ndarray:
        return u @ (uy / (s + alpha)[:, None])

    def loo_error(alpha: float) -> float:
        diag = (u**2) @ (1 / (s + alpha))
        return float(((coefficients(alpha) / diag[:, None]) ** 2).mean())

    alpha = min(np.logspace(1, 7, 25), key=loo_error)
    dual = coefficients(alpha)
    out = (pool_cells(corpus.effnet.features[val], 4) - mean_x) @ (x.T @ dual) + mean_y
    return np.clip(out, 0.0, 1.0)


def predict_crops(model, corpus: Corpus, val: np.ndarray, neighbors) -> list[np.ndarray]:
    return predict_variants(model, corpus, val, neighbors)[""]


def predict_variants(
    model, corpus: Corpus, val: np.ndarray, neighbors, ridge: np.ndarray | None = None
) -> dict[str, list[np.ndarray]]:
    """Ranked crops of the held-out photos, as `procrop crop` post-processes the model's
    proposals (key ""), and with retrieval variants of that post-processing on the same trained
    model and proposals (keys: the constants above): the alternatives by score (NMS at 0.85,
    the old shipping) instead of covering the `transfer_k` nearest's crops; the top-1 not fused
    with the neighbours' median crop; the alternatives by NMS at 0.7; the top-1 averaged with a
    second pass's on the mirrored cells and neighbours; the ridge regression's box (`ridge`) as
    a third estimate; the median crop of the model's K neighbours instead of its `transfer_k`
    nearest; the top-1 (before the fusion) the score-weighted mean of the proposals near the
    best (one-to-many matching trains 4 proposals on each crop), or of the 4 best; the fusion
    with weight 0.75 on the neighbours' median crop, or 1.0 (the median alone)."""
    from services.cropper.inputs import PhotoArrays, batch_arrays
    from services.cropper.model import CropInputs

    weight, cover = model.config.transfer_weight, model.config.cover_alternatives
    out: dict[str, list[np.ndarray]] = {"": []}
    if neighbors is not None:
        out |= {UNFUSED: [], NMS_07: [], FLIP: [], NARROW: [], NEXT_BEST: [], MERGED: [], TOP4: []}
        out |= {W75: [], W100: []}
        if ridge is not None:
            out[RIDGE] = []
    for start in range(0, len(val), 64):
        idx = val[start : start + 64]
        arrays = [
            PhotoArrays(None, float(np.log(corpus.sizes[i][0] / corpus.sizes[i][1])), corpus.effnet.features[i])
            for i in idx
        ]  # fmt: skip
        nb = neighbors[start : start + 64] if neighbors is not None else None
        scores, boxes = predict(model, CropInputs.from_arrays(batch_arrays(arrays, nb)))
        if nb is not None:
            mirrored = [dataclasses.replace(a, cues=_mirror_cells(a.cues)) for a in arrays]
            flipped = [n.flipped() for n in nb]
            m_scores, m_boxes = predict(
                model, CropInputs.from_arrays(batch_arrays(mirrored, flipped))
            )
            m_top = flip_xyxy(m_boxes[np.arange(len(idx)), m_scores.argmax(1)])
        for j, (i, s, b) in enumerate(zip(idx, scores, boxes, strict=True)):
            w, h = corpus.sizes[i]
            if nb is None:
                out[""].append(_ranked(s, b, w, h))
                continue
            median = nb[j].median_crop()
            alt = nb[j].samples() if cover else None  # the alternatives cover these crops
            fused = fuse_with_transfer(s, b, median, weight)
            out[""].append(_ranked(s, fused, w, h, samples=alt))
            out[NEXT_BEST].append(_ranked(s, fused, w, h))
            out[UNFUSED].append(_ranked(s, b, w, h, samples=alt))
            for key, share in ((W75, 0.75), (W100, 1.0)):
                out[key].append(
                    _ranked(s, fuse_with_transfer(s, b, median, share), w, h, samples=alt)
                )
            out[NMS_07].append(_ranked(s, fused, w, h, NMS_07_TOP))
            best = int(np.argmax(s))
            tta = b.copy()
            tta[best] = (b[best] + m_top[j]) / 2
            out[FLIP].append(
                _ranked(s, fuse_with_transfer(s, tta, median, weight), w, h, samples=alt)
            )
            if ridge is not None:  # weak_zero_shot asks without it
                three = b.copy()
                three[best] = (
                    b[best] + (median if median is not None else b[best]) + ridge[start + j]
                ) / 3
                out[RIDGE].append(_ranked(s, three, w, h, samples=alt))
            narrow = dataclasses.replace(nb[j], wide=None).median_crop()
            narrow_fused = fuse_with_transfer(s, b, narrow, weight)
            out[NARROW].append(_ranked(s, narrow_fused, w, h, samples=alt))
            order = np.argsort(-s, kind="stable")
            close = order[box_iou(b[best][None], b[order])[0] > 0.7][:4]  # the best among them
            for key, group in ((MERGED, close), (TOP4, order[:4])):
                merged = b.copy()
                merged[best] = (s[group, None] * b[group]).sum(0) / s[group].sum()
                merged_fused = fuse_with_transfer(s, merged, median, weight)
                out[key].append(_ranked(s, merged_fused, w, h, samples=alt))
    return out


def _mirror_cells(cells: np.ndarray) -> np.ndarray:
    """(64, C) cells of an 8 x 8 grid, mirrored left-right."""
    side = round(len(cells) ** 0.5)
    return np.ascontiguousarray(cells.reshape(side, side, -1)[:, ::-1].reshape(len(cells), -1))


def _ranked(
    scores: np.ndarray, boxes: np.ndarray, w: int, h: int, request: CropRequest = TOP,
    samples: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    result = select_crops(scores, boxes, w, h, request, samples)
    return np.asarray([np.asarray(c.box, np.float64) / [w, h, w, h] for c in result.crops])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="[default: the config's]")
    parser.add_argument("--only", nargs="*", default=None, help="rows to run (by name)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--vectors",
        choices=("encoder", "pooled-pca"),
        default="encoder",
        help="search vectors: the effnet encoder's (shipped), or a candidate: 256 principal "
        "directions of the centred 4 x 4-pooled cells [default: encoder]",
    )
    parser.add_argument(
        "--fold",
        type=int,
        nargs="*",
        default=None,
        help="run only these folds (0-based) [default: all]",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_train_config(args.config)
    optim = (
        config.optim
        if args.epochs is None
        else dataclasses.replace(config.optim, epochs=args.epochs)
    )
    started = time.perf_counter()
    corpus = load_corpus(args.fcdb, optim.views, optim.seed, config.model)
    if args.vectors == "pooled-pca":
        effnet = corpus.effnet
        vectors = pooled_pca_vectors(effnet.features)  # type: ignore[arg-type]
        corpus = dataclasses.replace(
            corpus, effnet=Embedding(effnet.tokens, vectors, effnet.features)
        )
    encode_s = time.perf_counter() - started
    n, k = len(corpus.names), config.model.k
    folds = np.array_split(np.random.default_rng(args.seed).permutation(n), args.folds)

    def median_of(vectors: np.ndarray) -> Callable[[np.ndarray, np.ndarray], list[np.ndarray]]:
        def run(train: np.ndarray, val: np.ndarray) -> list[np.ndarray]:
            return [median_box(corpus.crops[row])[None] for row in knn(vectors, val, train, k)]

        return run

    rows: dict[str, Callable[[np.ndarray, np.ndarray], Ranked]] = {
        "prior (median training crop)": lambda tr, va: [median_box(corpus.crops[tr])[None]] * len(va),
        f"kNN-{k} median, lite descriptor": median_of(corpus.lite_vectors),
        f"kNN-{k} median, effnet encoder": median_of(corpus.effnet.vectors),
    }  # fmt: skip
    for name, retrieval in (
        ("ProCrop effnet, no retrieval", False),
        ("ProCrop effnet + retrieval", True),
    ):
        cfg = dataclasses.replace(config.model, use_retrieval=retrieval)
        rows[name] = lambda tr, va, cfg=cfg: train_and_predict(
            corpus, tr, va, cfg, config.loss, optim
        )
    report = {}
    for name, run in rows.items():
        if args.only and not any(o in name for o in args.only):
            continue
        per_fold: dict[str, list[dict[str, float]]] = {}
        seconds = []
        for f in args.fold if args.fold is not None else range(args.folds):
            val = np.sort(folds[f])
            train = np.sort(np.concatenate([folds[j] for j in range(args.folds) if j != f]))
            t = time.perf_counter()
            ranked = run(train, val)
            seconds.append(time.perf_counter() - t)
            for variant, top in (ranked if isinstance(ranked, dict) else {"": ranked}).items():
                per_fold.setdefault(name + variant, []).append(score(corpus, val, top))
                print(f"{name + variant} fold {f}: {per_fold[name + variant][-1]} "
                      f"({seconds[-1]:.0f} s)", flush=True)  # fmt: skip
        for row, scores in per_fold.items():
            report[row] = (
                {"folds_run": sorted(args.fold) if args.fold is not None else "all"}
                | _mean_std(scores)
                | {"seconds_per_fold": round(float(np.median(seconds)), 1)}
            )
            if row != name:  # a variant: its per-fold difference from the shipped one
                report[row]["paired_iou_gain"] = _paired(per_fold[name], scores, "iou")
                report[row]["paired_best_of_3_gain"] = _paired(per_fold[name], scores, "best_of_3")
            print(row, report[row], flush=True)
    emit("cv_crop_models", {"photos": n, "folds": args.folds, "epochs": optim.epochs,
                            "vectors": args.vectors,
                            "encode_seconds": round(encode_s, 1), "rows": report,
                            "shipped_mb": shipped_sizes()})  # fmt: skip


def _mean_std(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        metric: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}
        for metric, v in ((m, [p[m] for p in per_fold]) for m in per_fold[0])
    }


def _paired(base: list[dict[str, float]], variant: list[dict[str, float]], metric: str) -> dict:
    """The variant's gain over the shipped post-processing, fold by fold (same model, same
    photos): its mean, std, and the per-fold values."""
    gains = [v[metric] - b[metric] for b, v in zip(base, variant, strict=True)]
    return {"mean": round(float(np.mean(gains)), 4), "std": round(float(np.std(gains)), 4),
            "folds": [round(g, 4) for g in gains]}  # fmt: skip


def shipped_sizes() -> dict[str, float]:
    """Megabytes of what `procrop crop` loads: the lite bundle and the effnet encoder's files."""
    from services.embedder.pretrained import ONNX_FILE, PCA_FILE
    from shared.checkpoints import shipped_bundle

    bundle = sum(p.stat().st_size for p in shipped_bundle().iterdir() if p.is_file())
    encoder = ONNX_FILE.stat().st_size + PCA_FILE.stat().st_size
    return {"bundle": round(bundle / 1e6, 1), "encoder": round(encoder / 1e6, 1),
            "total": round((bundle + encoder) / 1e6, 1)}  # fmt: skip


if __name__ == "__main__":
    main()
