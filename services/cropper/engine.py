"""One training epoch and evaluation: plain functions over a model, a loader and a criterion."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from services.cropper.loss import SetCriterion
from services.cropper.model import CropInputs
from services.cropper.runtime import rank_proposals
from shared.boxes import cxcywh_to_xyxy
from shared.metrics import best_iou_and_disp

Batch = tuple[CropInputs, list[torch.Tensor], list[torch.Tensor]]


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    grad_clip: float = 0.1,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train over `batches`; returns the mean of each logged loss."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for inputs, targets, weights in batches:
        outputs = model(inputs.to(device))
        losses = criterion(
            outputs, [t.to(device) for t in targets], [w.to(device) for w in weights]
        )
        if not math.isfinite(losses["loss"].item()):
            raise FloatingPointError(f"loss is {losses['loss'].item()}; stopping")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        logged = {k: v.item() for k, v in losses.items() if "_" not in k}
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        if on_step:
            on_step(logged)
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def predict(model: nn.Module, inputs: CropInputs) -> tuple[np.ndarray, np.ndarray]:
    """Proposals ranked best first: scores (B, Q) in (0, 1) and boxes (B, Q, 4) normalized xyxy."""
    model.eval()
    out = model(inputs)
    return rank_proposals(out["logits"].float().cpu().numpy(), out["boxes"].float().cpu().numpy())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Top-1 IoU, Disp and acc (IoU >= 0.85) against the best ground truth (normalized boxes)."""
    ious, disps = [], []
    for inputs, targets, _ in batches:
        _, boxes = predict(model, inputs.to(device))
        for top, truth in zip(boxes[:, 0], targets, strict=True):
            iou, disp = best_iou_and_disp(top, cxcywh_to_xyxy(truth).numpy(), 1.0, 1.0)
            ious.append(iou)
            disps.append(disp)
    iou_arr = np.asarray(ious)
    return {
        "iou": float(iou_arr.mean()),
        "disp": float(np.mean(disps)),
        "acc85": float((iou_arr >= 0.85).mean()),
        "n": len(ious),
    }
