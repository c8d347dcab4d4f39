"""Training loss of the crop model (the paper's, after Conditional DETR).

- score: sigmoid focal loss (alpha 0.25, gamma 2) on every proposal. Matched proposals have target
  1 (or the ground truth's relative score, for datasets with graded crops); an unmatched proposal
  whose IoU with some ground truth is >= 0.85 gets that IoU as a soft target; the rest 0.
- box: L1 on normalized cxcywh and 1 - GIoU, on matched proposals only.
Normalized by the number of ground-truth crops in the batch; summed over decoder layers (aux).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.cropper.config import LossConfig
from services.cropper.matcher import HungarianMatcher
from shared.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou


class SetCriterion:
    def __init__(self, config: LossConfig) -> None:
        self.config = config
        self.matcher = HungarianMatcher(
            config.cost_score, config.cost_l1, config.cost_giou, config.focal_alpha,
            config.focal_gamma,
        )  # fmt: skip

    def __call__(
        self, outputs: dict, targets: list[torch.Tensor], weights: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """outputs from `ProCrop.forward`; targets[b] (G_b, 4) cxcywh; weights[b] (G_b,) in (0, 1]
        score targets of the ground truths (None: all 1). Returns the named losses and "loss"."""
        weights = weights or [t.new_ones(len(t)) for t in targets]
        num = max(sum(len(t) for t in targets), 1)
        layers = [outputs, *outputs["aux"]] if self.config.aux_loss else [outputs]
        total: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            for name, value in self._layer_losses(layer, targets, weights, num).items():
                total[name if i == 0 else f"{name}_{i}"] = value
        c = self.config
        total["loss"] = torch.stack([
            c.weight_score * v if k.startswith("score")
            else c.weight_l1 * v if k.startswith("l1") else c.weight_giou * v
            for k, v in list(total.items())
        ]).sum()  # fmt: skip
        return total

    def _layer_losses(
        self, layer: dict, targets: list[torch.Tensor], weights: list[torch.Tensor], num: int
    ) -> dict[str, torch.Tensor]:
        logits, boxes = layer["logits"], layer["boxes"]
        copies = self.config.match_copies
        if copies > 1:  # one-to-many: each ground truth is matched to `copies` proposals
            targets = [t.repeat(copies, 1) for t in targets]
            weights = [w.repeat(copies) for w in weights]
            num *= copies
        matches = self.matcher(logits, boxes, targets)
        score_target = self._score_targets(boxes, targets, weights, matches)
        focal = sigmoid_focal_loss(
            logits, score_target, self.config.focal_alpha, self.config.focal_gamma
        )
        pred = torch.cat([boxes[b, rows] for b, (rows, _) in enumerate(matches)])
        truth = torch.cat([targets[b][cols] for b, (_, cols) in enumerate(matches)])
        giou = generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(truth)).diagonal()
        return {
            "score": focal.sum() / num,
            "l1": F.l1_loss(pred, truth, reduction="sum") / num,
            "giou": (1 - giou).sum() / num,
        }

    @torch.no_grad()
    def _score_targets(
        self,
        boxes: torch.Tensor,
        targets: list[torch.Tensor],
        weights: list[torch.Tensor],
        matches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """(B, Q) score targets in [0, 1]."""
        out = torch.zeros(boxes.shape[:2], device=boxes.device)
        for b, (rows, cols) in enumerate(matches):
            if not len(targets[b]):
                continue
            iou = box_iou(cxcywh_to_xyxy(boxes[b].float()), cxcywh_to_xyxy(targets[b].float()))
            best, best_gt = iou.max(dim=1)  # (Q,)
            soft = torch.where(best >= self.config.soft_iou, best * weights[b][best_gt], 0.0)
            out[b] = soft
            out[b, rows.to(boxes.device)] = weights[b][cols.to(boxes.device)].float()
        return out


def sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise focal loss with soft targets in [0, 1] (RetinaNet's, generalized to soft)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    modulator = (target - p).abs() ** gamma
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * modulator * ce
