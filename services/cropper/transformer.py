"""Conditional-DETR transformer parts: sine position embeddings, the encoder, the fusion blocks
(retrieval f_R and text f_M) and the decoder whose cross-attention is conditioned on anchors.

Every token sequence here is batch-first: (B, L, d). Boxes are normalized (cx, cy, w, h).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def sine_embed(
    coords: torch.Tensor, dim_per_coord: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(..., C) coordinates in [0, 1] -> (..., C * dim_per_coord) sine/cosine features."""
    freqs = torch.arange(dim_per_coord // 2, dtype=torch.float32, device=coords.device)
    freqs = temperature ** (2 * freqs / dim_per_coord)  # (D/2,)
    angles = coords.unsqueeze(-1) * (2 * math.pi) / freqs  # (..., C, D/2)
    emb = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (..., C, D/2, 2)
    return emb.flatten(-3)


def grid_positions(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """(H * W, dim) sine embedding of cell centres on an H x W grid (row-major, like DETR)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return sine_embed(torch.stack([yy, xx], -1).reshape(-1, 2), dim // 2)


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.net(x)))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; positions are added to queries and keys (DETR)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm(x + self.drop(self.attn(q, q, x, need_weights=False)[0]))
        return self.ffn(x)


class CrossFusion(nn.Module):
    """The paper's fusion: Concat(f_I, P(X), CrossAttn(q = f_I, kv = P(X))) along the sequence.

    P is a learnable projection of the side information X (retrieved composition tokens or BLIP
    multimodal tokens) into the model width.
    """

    def __init__(self, d_side: int, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(d_side, dim), nn.LayerNorm(dim))
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        f_i: torch.Tensor,
        pos_i: torch.Tensor,
        side: torch.Tensor,
        pos_side: torch.Tensor,
        pad_side: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f_i (B, L, d), side (B, M, d_side), pad_side (B, M) True on padding.

        Returns:
            projected side tokens P(X) (B, M, d) and the attended tokens (B, L, d).
        """
        p = self.project(side)
        attended = self.attn(f_i + pos_i, p + pos_side, p, key_padding_mask=pad_side)[0]
        return p, self.norm(f_i + attended)


class ConditionalDecoderLayer(nn.Module):
    """Conditional-DETR decoder layer: self-attention over the proposals, then cross-attention
    whose per-head queries and keys concatenate a content part and a spatial part; the spatial
    query is the anchor's embedding scaled by a transform of the content (lambda_q)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_content, self.k_content = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_spatial, self.k_spatial = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        spatial: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, query_pos, spatial (B, Q, d); memory, memory_pos (B, M, d); memory_pad (B, M)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        q = self._heads(self.q_content(tgt), self.q_spatial(spatial))  # (B, h, Q, 2 d/h)
        k = self._heads(self.k_content(memory), self.k_spatial(memory_pos))  # (B, h, M, 2 d/h)
        v = self.value(memory).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, M, d/h)
        mask = None if memory_pad is None else ~memory_pad[:, None, None, :]
        drop = self.drop.p if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        attended = attended.transpose(1, 2).flatten(2)  # (B, Q, d)
        tgt = self.norm2(tgt + self.drop(self.out(attended)))
        return self.ffn(tgt)

    def _heads(self, content: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        content = content.unflatten(-1, (self.heads, -1))
        spatial = spatial.unflatten(-1, (self.heads, -1))
        return torch.cat([content, spatial], dim=-1).transpose(1, 2)


class ConditionalDecoder(nn.Module):
    """Stack of conditional layers over anchors; returns every layer's normalized output."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(layers)
        )
        self.anchor_head = MLP(dim, dim, dim, 2)  # sine(anchor) -> query position
        self.scale_head = MLP(dim, dim, dim, 2)  # content -> lambda_q
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(
        self,
        tgt: torch.Tensor,
        anchors: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_pad: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """tgt (B, Q, d); anchors (B, Q, 4) cxcywh in (0, 1) -> [(B, Q, d)] one per layer."""
        anchor_sine = sine_embed(anchors, self.dim // 4)  # (B, Q, d)
        query_pos = self.anchor_head(anchor_sine)
        outputs = []
        for i, layer in enumerate(self.layers):
            scale = 1.0 if i == 0 else self.scale_head(tgt)
            tgt = layer(tgt, query_pos, anchor_sine * scale, memory, memory_pos, memory_pad)
            outputs.append(self.norm(tgt))
        return outputs
