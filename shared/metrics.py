"""Crop-quality metrics of the field, on pixel or normalized xyxy boxes (numpy).

- IoU of the top-1 crop against the best ground truth (FCDB, FLMS, SACD protocol);
- boundary displacement Disp = (|dx1| + |dx2|) / W + (|dy1| + |dy2|) / H, over 4, against the
  same ground truth as IoU (the one of best IoU).
"""

from __future__ import annotations

import numpy as np

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
