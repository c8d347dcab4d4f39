"""Crop-quality metrics of the field, on pixel or normalized xyxy boxes (numpy).

- IoU of the top-1 crop against the best ground truth (FCDB, FLMS, SACD protocol);
- boundary displacement Disp = (|dx1| + |dx2|) / W + (|dy1| + |dy2|) / H, over 4, against the
  same ground truth as IoU (the one of best IoU);
- acc: the share of photos whose top-1 IoU is >= 0.85;
- GAICD Acc_K/N (Zeng et al. 2019): the share of the top-K predicted crops that match, at
  IoU >= 0.85, a grid candidate among the N of highest mean opinion score (MOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

from shared.boxes import box_iou


def best_iou_and_disp(
    pred: np.ndarray, truths: np.ndarray, width: float, height: float
) -> tuple[float, float]:
    """IoU and Disp of one predicted crop against the best of several ground truths.

    Args:
        pred: (4,) xyxy crop; truths: (G, 4) xyxy crops, same units as `width` / `height`.
    Returns:
        (IoU in [0, 1], Disp in [0, 1]).
    """
    pred = np.asarray(pred, np.float64).reshape(1, 4)
    truths = np.asarray(truths, np.float64).reshape(-1, 4)
    ious = box_iou(pred, truths)[0]
    best = int(np.argmax(ious))
    diff = np.abs(pred[0] - truths[best])
    disp = ((diff[0] + diff[2]) / width + (diff[1] + diff[3]) / height) / 4
    return float(ious[best]), float(disp)


# The field's "same crop" IoU: the acc threshold on FCDB / FLMS and the GAICD matching threshold.
SAME_CROP_IOU = 0.85
# Slack on IoU thresholds so that a float-rounded 0.85 (e.g. of normalized boxes) still counts.
_IOU_SLACK = 1e-9
GAICD_KS = (1, 2, 3, 4)
GAICD_NS = (5, 10)


@dataclass(frozen=True)
class CropScores:
    """Mean top-1 scores over photos (FCDB / FLMS protocol).

    iou: mean IoU in [0, 1]; disp: mean Disp in [0, 1]; acc_iou85: share of photos with
    IoU >= 0.85, in [0, 1]; photos: how many photos were averaged.
    """

    iou: float
    disp: float
    acc_iou85: float
    photos: int

    def as_dict(self) -> dict[str, float]:
        """{"iou", "disp", "acc_iou85", "photos"} -> values, e.g. for a JSON report."""
        return asdict(self)


def crop_scores(
    preds: ArrayLike,
    truths_list: Sequence[ArrayLike],
    sizes: Sequence[tuple[float, float]],
) -> CropScores:
    """Mean IoU, Disp and acc of top-1 crops, each against its photo's best-IoU ground truth.

    Args:
        preds: (P, 4) top-1 crops, xyxy (an array or P boxes).
        truths_list: P arrays of ground-truth crops, each (G_i, 4) xyxy with G_i >= 1.
        sizes: P (width, height) of the photos, in the units of the boxes.
    Raises:
        ValueError: no photos, lengths that differ, or a photo without ground truth.
    """
    preds = np.asarray(preds, np.float64).reshape(-1, 4)
    if not len(preds) == len(truths_list) == len(sizes):
        raise ValueError(
            f"preds, truths_list and sizes must have one entry per photo; got "
            f"{len(preds)}, {len(truths_list)} and {len(sizes)}"
        )
    if len(preds) == 0:
        raise ValueError("crop_scores needs at least one photo; got none")
    scores = []
    for i, (pred, truths, (width, height)) in enumerate(
        zip(preds, truths_list, sizes, strict=True)
    ):
        truths = np.asarray(truths, np.float64)
        if truths.size == 0:
            raise ValueError(f"photo {i} has no ground-truth crop")
        scores.append(best_iou_and_disp(pred, truths, width, height))
    ious, disps = np.asarray(scores, np.float64).T  # (P,), (P,)
    return CropScores(
        iou=float(ious.mean()),
        disp=float(disps.mean()),
        acc_iou85=float(np.mean(ious >= SAME_CROP_IOU - _IOU_SLACK)),
        photos=len(ious),
    )


def _mos_ranks_of_matches(
    preds: np.ndarray, grid: np.ndarray, mos: np.ndarray, match_iou: float
) -> np.ndarray:
    """For each prediction, how many grid crops have a strictly higher MOS than its match.

    A prediction matches the grid crop of highest IoU (the first one on ties), if that IoU is
    >= `match_iou`; unmatched predictions get +inf. The match is among the top N by MOS (ties
    included: MOS >= the N-th largest) exactly when this count is < N.

    Args:
        preds: (P, 4) xyxy; grid: (C, 4) xyxy, C >= 1; mos: (C,).
    Returns:
        (P,) float64 counts in [0, C - 1], or +inf.
    """
    if len(preds) == 0:
        return np.zeros(0)
    ious = box_iou(preds, grid)  # (P, C)
    match = ious.argmax(axis=1)  # (P,)
    higher = (mos[None, :] > mos[match][:, None]).sum(axis=1).astype(np.float64)  # (P,)
    matched = ious[np.arange(len(preds)), match] >= match_iou - _IOU_SLACK
    return np.where(matched, higher, np.inf)


def _photo_ranks(
    pred_boxes_per_photo: Sequence[ArrayLike],
    grid_boxes_per_photo: Sequence[ArrayLike],
    mos_per_photo: Sequence[ArrayLike],
    match_iou: float,
) -> list[np.ndarray]:
    """Validated inputs -> per photo, `_mos_ranks_of_matches` of its ranked predictions."""
    counts = (len(pred_boxes_per_photo), len(grid_boxes_per_photo), len(mos_per_photo))
    if len(set(counts)) != 1:
        raise ValueError(f"need one entry per photo in each input; got {counts} entries")
    if counts[0] == 0:
        raise ValueError("GAICD accuracy needs at least one photo; got none")
    ranks = []
    for i, (preds, grid, mos) in enumerate(
        zip(pred_boxes_per_photo, grid_boxes_per_photo, mos_per_photo, strict=True)
    ):
        grid_array = np.asarray(grid, np.float64).reshape(-1, 4)
        mos_array = np.asarray(mos, np.float64).reshape(-1)
        if len(grid_array) == 0 or len(mos_array) != len(grid_array):
            raise ValueError(
                f"photo {i}: need >= 1 grid crop and one MOS per grid crop; "
                f"got {len(grid_array)} crops and {len(mos_array)} scores"
            )
        pred_array = np.asarray(preds, np.float64).reshape(-1, 4)
        ranks.append(_mos_ranks_of_matches(pred_array, grid_array, mos_array, match_iou))
    return ranks


def _acc_from_ranks(ranks: list[np.ndarray], k: int, n: int) -> float:
    """Mean over photos of (1 / K) * #(top-K predictions matched into the top N by MOS)."""
    if k < 1 or n < 1:
        raise ValueError(f"K and N must be >= 1; got K={k}, N={n}")
    # Predictions beyond a photo's list are misses: slicing just leaves them out of the count.
    return float(np.mean([np.sum(r[:k] < n) / k for r in ranks]))


def acc_k_n(
    pred_boxes_per_photo: Sequence[ArrayLike],
    grid_boxes_per_photo: Sequence[ArrayLike],
    mos_per_photo: Sequence[ArrayLike],
    k: int,
    n: int,
    match_iou: float = SAME_CROP_IOU,
) -> float:
    """GAICD Acc_K/N, averaged over photos, in [0, 1].

    Each of a photo's first K predictions is matched to the grid crop of highest IoU (the
    first on ties); it is a hit if that IoU is >= `match_iou` and the grid crop's MOS is >= the
    N-th largest MOS of the photo (every crop counts as top N when there are <= N). Two
    predictions that match the same grid crop both count. Missing predictions are misses.

    Args:
        pred_boxes_per_photo: per photo, (P_i, 4) xyxy predictions, best first (P_i may be 0).
        grid_boxes_per_photo: per photo, (C_i, 4) xyxy candidate crops, C_i >= 1.
        mos_per_photo: per photo, (C_i,) mean opinion scores of the candidates.
        k: predictions considered per photo, >= 1; n: top-N by MOS, >= 1.
        match_iou: least IoU for a prediction to match a grid crop.
    Raises:
        ValueError: no photos, inputs of different lengths, a photo without grid crops or with
            a MOS count unlike its crop count, K or N < 1.
    """
    ranks = _photo_ranks(pred_boxes_per_photo, grid_boxes_per_photo, mos_per_photo, match_iou)
    return _acc_from_ranks(ranks, k, n)


def gaicd_acc_table(
    pred_boxes_per_photo: Sequence[ArrayLike],
    grid_boxes_per_photo: Sequence[ArrayLike],
    mos_per_photo: Sequence[ArrayLike],
    match_iou: float = SAME_CROP_IOU,
) -> dict[str, float]:
    """The GAICD table row: "Acc1/5" ... "Acc4/5", "Acc1/10" ... "Acc4/10", "Acc_5", "Acc_10".

    Cells are `acc_k_n` for K in 1..4 and N in (5, 10), in [0, 1]; "Acc_N" is the mean of the
    four Acc_K/N. Arguments and errors as for `acc_k_n`.
    """
    ranks = _photo_ranks(pred_boxes_per_photo, grid_boxes_per_photo, mos_per_photo, match_iou)
    table: dict[str, float] = {}
    for n in GAICD_NS:
        cells = {f"Acc{k}/{n}": _acc_from_ranks(ranks, k, n) for k in GAICD_KS}
        table |= cells
        table[f"Acc_{n}"] = float(np.mean(list(cells.values())))
    return table
