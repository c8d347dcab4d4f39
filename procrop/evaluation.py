"""`procrop eval`: crop quality on an annotated set, in the paper's table shape.

- Photos with one (or a few) expert crops (FCDB, FLMS, JSON lines): IoU and Disp of the top-1 crop
  against the best ground truth, and acc = share of photos with IoU >= 0.85.
- Photos with graded candidate crops (GAICD): Acc_K/N of the top-4 diverse crops.
Baselines, on request: the whole photo, the centred 90% crop, and kNN crop transfer (the median
of the K retrieved neighbours' crops, #2's retrieval alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from procrop.cropping import prepared_batches
from services.cropper.postprocess import CropRequest, CropResult
from services.cropper.predictor import CropPredictor
from shared.annotations import AnnotatedPhoto
from shared.boxes import denormalize_xyxy
from shared.errors import ProCropError
from shared.metrics import crop_scores, gaicd_acc_table


@dataclass
class _Collected:
    top1: dict[str, list[np.ndarray]] = field(default_factory=dict)  # method -> (4,) pixel xyxy
    top4: list[np.ndarray] = field(default_factory=list)  # (<=4, 4) pixel xyxy per photo
    truths: list[np.ndarray] = field(default_factory=list)  # (G, 4) pixel xyxy per photo
    mos: list[np.ndarray] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def evaluate(
    predictor: CropPredictor,
    labels: dict[str, AnnotatedPhoto],
    root: Path,
    names: Sequence[str],
    baselines: bool = False,
    on_progress: Callable[[int], None] | None = None,
    max_pixels: int = 50_000_000,
) -> dict[str, dict[str, float]]:
    """{method: metrics} for the model (and baselines) over `names` (paths under `root`)."""
    if not names:
        raise ProCropError("nothing to evaluate: no annotated photos selected")
    got = _Collected()
    paths = [str(root / name) for name in names]
    by_path = dict(zip(paths, names, strict=True))
    top4 = CropRequest(4)
    for photos, errors, prepared in prepared_batches(predictor, paths, max_pixels):
        if errors:
            raise ProCropError(errors[0])
        knn: list[np.ndarray | None] = [None] * len(prepared)
        if baselines and predictor.retrieval is not None:  # kNN crop transfer
            knn = [n.median_crop() for n in predictor.neighbors(prepared)]
        results = predictor.crop_prepared(prepared, top4)
        for photo, result, transfer in zip(photos, results, knn, strict=True):
            label = labels[by_path[photo.path]]
            _collect(got, predictor.config.k, label, result, transfer, baselines)
        if on_progress:
            on_progress(len(photos))
    return _report(got)


def _collect(
    got: _Collected,
    k: int,
    label: AnnotatedPhoto,
    result: CropResult,
    knn: np.ndarray | None,
    baselines: bool,
) -> None:
    w, h = result.width, result.height
    truths = denormalize_xyxy(np.asarray(label.crops_norm, np.float64), w, h)
    got.truths.append(truths)
    got.sizes.append((w, h))
    got.mos.append(np.asarray(label.scores if label.scores is not None else [1.0] * len(truths)))
    got.top4.append(np.asarray([c.box for c in result.crops], np.float64))
    top1 = {"ProCrop": got.top4[-1][0]}
    if baselines:
        top1["whole photo"] = np.array([0, 0, w, h], np.float64)
        top1["centre 90%"] = np.array([0.05 * w, 0.05 * h, 0.95 * w, 0.95 * h])
        if knn is not None:
            top1[f"kNN-{k} median"] = denormalize_xyxy(knn, w, h)
    for method, box in top1.items():
        got.top1.setdefault(method, []).append(box)


def _report(got: _Collected) -> dict[str, dict[str, float]]:
    graded = any(len(t) > 1 for t in got.truths) and any(len(set(m.tolist())) > 1 for m in got.mos)
    report: dict[str, dict[str, float]] = {}
    for method, boxes in got.top1.items():
        if len(boxes) == len(got.truths):
            report[method] = crop_scores(np.stack(boxes), got.truths, got.sizes).as_dict()
    if graded:
        report["ProCrop"] |= gaicd_acc_table(got.top4, got.truths, got.mos)
    return report


def format_table(report: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per method, IoU / Disp / acc (and Acc_K/N when graded)."""
    extra = [k for k in next(iter(report.values())) if k.startswith("Acc")]
    header = ["method", "IoU", "Disp", "acc(IoU>=0.85)", *extra]
    rows = [header] + [
        [m, f"{r['iou']:.4f}", f"{r['disp']:.4f}", f"{r['acc_iou85']:.3f}"]
        + [f"{r.get(k, float('nan')):.3f}" for k in extra]
        for m, r in report.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )
