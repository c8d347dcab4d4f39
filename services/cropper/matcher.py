"""Hungarian matching of proposals to ground-truth crops (scipy's linear_sum_assignment).

Cost = cost_score * focal score cost + cost_l1 * L1(cxcywh) - cost_giou * GIoU, as in
Conditional DETR; each ground truth gets exactly one proposal.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from shared.boxes import cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher:
    def __init__(
        self,
        cost_score: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        self.cost_score, self.cost_l1, self.cost_giou = cost_score, cost_l1, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def __call__(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits (B, Q); boxes (B, Q, 4) cxcywh; targets[b] (G_b, 4) cxcywh ground truths.

        Returns:
            per photo, (proposal indices, target indices), int64 tensors of length min(Q, G_b).
        """
        out = []
        for b, truth in enumerate(targets):
            if not len(truth):
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            cost = self.cost_matrix(logits[b], boxes[b], truth).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols)))
        return out

    def cost_matrix(
        self, logits: torch.Tensor, boxes: torch.Tensor, truth: torch.Tensor
    ) -> torch.Tensor:
        """(Q,) logits, (Q, 4) and (G, 4) cxcywh boxes -> (Q, G) matching cost."""
        p = logits.float().sigmoid()
        neg = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
        pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
        score = (pos - neg)[:, None]  # (Q, 1), the same for every ground truth
        l1 = torch.cdist(boxes.float(), truth.float(), p=1)  # (Q, G)
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(truth.float()))
        return self.cost_score * score + self.cost_l1 * l1 - self.cost_giou * giou
