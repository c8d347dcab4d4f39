"""ProCrop: crop proposals from a photo, guided by the compositions of retrieved professional photos.

    photo -> backbone -> Conditional-DETR encoder -> f_I                         (B, L, d)
    K retrieved token sets R -> P(R); CrossAttn(q = f_I, kv = P(R))    -> f_R    (retrieval fusion)
    BLIP multimodal tokens M  -> P'(M); CrossAttn(q = f_I, kv = P'(M)) -> f_M    (text fusion)
    decoder(queries on anchors, memory = Concat(f_R, f_M)) -> N boxes (cxcywh) + aesthetic scores

f_I appears once in the memory (the paper's Concat(f_R, f_M) holds it twice; a copy adds nothing to
attention). When the retrieved photos carry crop annotations (paper Table 5, image + annotation
retrieval), each crop is also a memory token, and K + 1 extra queries start from the neighbours'
crops and their median, next to the N learnable anchors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from services.cropper.backbone import FeatureBackbone, LiteBackbone, ResNetBackbone, build_backbone
from services.cropper.config import ModelConfig
from services.cropper.transformer import (
    MLP,
    ConditionalDecoder,
    CrossFusion,
    EncoderLayer,
    grid_positions,
    sine_embed,
)
from services.embedder.base import GRID

EPS = 1e-3  # anchors are kept inside (EPS, 1 - EPS) so their inverse sigmoid stays finite


@dataclass
class CropInputs:
    """One batch of B photos, as the model reads it.

    images:    (B, 3, S, S) float32, ImageNet-normalized pixels of the resized photo, or None
               (features backbone: the encoder's cells in `cues` are the image features).
    aspect:    (B,) float32, log(width / height) of the original photo.
    cues:      (B, 64, C) float32 weight-free cue tokens (lite backbone), the encoder's feature
               cells (features backbone), or None.
    tokens:    (B, K, 64, T) float32 composition tokens of the K retrieved photos, or None.
    boxes:     (B, K, 4) float32 retrieved crops, normalized cxcywh (zeros where absent), or None.
    box_mask:  (B, K) bool, True where a neighbour has a crop, or None.
    text:      (B, L, D_t) float32 BLIP multimodal tokens, or None.
    text_mask: (B, L) bool, True on real text tokens, or None.
    """

    images: torch.Tensor | None
    aspect: torch.Tensor
    cues: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    box_mask: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CropInputs:
        """Tensors of a batch made by `services.cropper.inputs.batch_arrays`."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        return cls(**{"images": None, **tensors})  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> CropInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return CropInputs(**{k: None if v is None else v.to(device) for k, v in moved.items()})  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.aspect)


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(EPS, 1 - EPS)
    return torch.log(x / (1 - x))


def default_anchors(n: int) -> torch.Tensor:
    """(n, 4) cxcywh starting anchors: crops of 55-95% of each side around the centre."""
    sizes = torch.tensor([0.95, 0.85, 0.75, 0.65, 0.55])
    offsets = torch.tensor([0.5, 0.42, 0.58])
    anchors = []
    for i in range(n):
        w = sizes[i % len(sizes)]
        h = sizes[(i // len(sizes) + i) % len(sizes)]
        cx, cy = offsets[(i // 3) % 3], offsets[i % 3]
        anchors.append(torch.stack([cx, cy, w, h]))
    return torch.stack(anchors)


class ProCrop(nn.Module):
    """The crop model; `forward(CropInputs)` -> {"logits", "boxes", "aux"} (see `forward`)."""

    def __init__(
        self, config: ModelConfig, backbone: LiteBackbone | FeatureBackbone | ResNetBackbone
    ) -> None:
        super().__init__()
        d = config.hidden_dim
        self.config = config
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels, d, 1)
        self.aspect_embed = MLP(1, d, d, 2)
        self.encoder = nn.ModuleList(
            EncoderLayer(d, config.num_heads, config.ffn_dim, config.dropout)
            for _ in range(config.enc_layers)
        )
        heads, drop = config.num_heads, config.dropout
        # Learned "which stream is this token from" embeddings: image, P(R), f_R attn, crops, text.
        self.stream_embed = nn.Parameter(torch.randn(6, d) * 0.02)
        if config.use_retrieval:
            self.retrieval_fusion = CrossFusion(config.token_dim, d, heads, drop)
            self.rank_embed = nn.Parameter(torch.randn(config.k, d) * 0.02)
        if config.num_anchor_queries:
            self.crop_embed = MLP(d, d, d, 2)
            self.anchor_content = nn.Parameter(torch.randn(config.num_anchor_queries, d) * 0.02)
        if config.use_text:
            self.text_fusion = CrossFusion(config.text_dim, d, heads, drop)
        self.anchors = nn.Parameter(inverse_sigmoid(default_anchors(config.num_queries)))
        self.decoder = ConditionalDecoder(d, heads, config.ffn_dim, drop, config.dec_layers)
        self.score_head = nn.Linear(d, 1)
        self.box_head = MLP(d, d, 4, 3)
        last = self.box_head.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)  # proposals start on their anchors
        nn.init.zeros_(last.bias)
        nn.init.constant_(self.score_head.bias, -4.6)  # focal-loss prior: p = 0.01

    @property
    def num_proposals(self) -> int:
        return self.config.num_queries + self.config.num_anchor_queries

    def forward(self, inputs: CropInputs) -> dict:
        """Returns:
        logits: (B, Q) aesthetic score logits (sigmoid -> score in (0, 1));
        boxes:  (B, Q, 4) normalized cxcywh proposals, Q = num_proposals;
        aux:    [{"logits", "boxes"}] of the earlier decoder layers (for the auxiliary loss).
        """
        f_i, pos_i = self._encode(inputs)
        memory, memory_pos, memory_pad = self._fuse(inputs, f_i, pos_i)
        tgt, anchors = self._queries(inputs)
        outputs = self.decoder(tgt, anchors, memory, memory_pos, memory_pad)
        base = inverse_sigmoid(anchors)
        layers = [
            {"logits": self.score_head(o).squeeze(-1), "boxes": (base + self.box_head(o)).sigmoid()}
            for o in outputs
        ]
        return {**layers[-1], "aux": layers[:-1]}

    def _encode(self, inputs: CropInputs) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.input_proj(self.backbone(inputs.images, inputs.cues))  # (B, d, h, w)
        h, w = feat.shape[-2:]
        f_i = feat.flatten(2).transpose(1, 2)  # (B, h * w, d)
        f_i = f_i + self.aspect_embed(inputs.aspect[:, None])[:, None]
        pos_i = grid_positions(h, w, f_i.shape[-1], f_i.device)[None]  # (1, h * w, d)
        for layer in self.encoder:
            f_i = layer(f_i, pos_i)
        return f_i, pos_i.expand(f_i.shape[0], -1, -1)

    def _fuse(
        self, inputs: CropInputs, f_i: torch.Tensor, pos_i: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory of the decoder: (B, M, d) tokens, (B, M, d) positions, (B, M) padding mask."""
        b, d, s = f_i.shape[0], f_i.shape[-1], self.stream_embed
        parts = [(f_i, pos_i + s[0], _no_pad(f_i))]
        if self.config.use_retrieval:
            tokens = _required(inputs.tokens, "tokens")  # (B, K, 64, T)
            k, t = tokens.shape[1], tokens.shape[2]
            cell_pos = grid_positions(GRID, GRID, d, f_i.device)  # (64, d)
            pos_r = (cell_pos[None] + self.rank_embed[:k, None]).reshape(1, k * t, d)
            pos_r = pos_r.expand(b, -1, -1) + s[1]
            p_r, att = self.retrieval_fusion(f_i, pos_i, tokens.flatten(1, 2), pos_r)
            parts += [(p_r, pos_r, _no_pad(p_r)), (att, pos_i + s[2], _no_pad(att))]
            if self.config.use_annotations:
                boxes = _required(inputs.boxes, "boxes")
                mask = _required(inputs.box_mask, "box_mask")
                crops = self.crop_embed(sine_embed(boxes, d // 4))  # (B, K, d)
                pos_c = sine_embed(boxes[..., :2], d // 2) + self.rank_embed[:k] + s[3]
                parts.append((crops, pos_c, ~mask))
        if self.config.use_text:
            text, mask = _required(inputs.text, "text"), _required(inputs.text_mask, "text_mask")
            pos_t = s[4].expand(b, text.shape[1], d)
            p_m, att = self.text_fusion(f_i, pos_i, text, pos_t, ~mask)
            parts += [(p_m, pos_t, ~mask), (att, pos_i + s[5], _no_pad(att))]
        seqs, pos, pad = zip(*parts, strict=True)
        return torch.cat(seqs, 1), torch.cat(pos, 1), torch.cat(pad, 1)

    def _queries(self, inputs: CropInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder queries: content (B, Q, d) and anchors (B, Q, 4) cxcywh."""
        b, d = inputs.aspect.shape[0], self.config.hidden_dim  # traced: a dynamic batch
        anchors = self.anchors.sigmoid()[None].expand(b, -1, -1)
        tgt = anchors.new_zeros(b, self.config.num_queries, d)
        if self.config.num_anchor_queries:
            retrieved = retrieved_anchors(_required(inputs.boxes, "boxes"), inputs.box_mask)
            anchors = torch.cat([anchors, retrieved], 1)
            tgt = torch.cat([tgt, self.anchor_content[None].expand(b, -1, -1)], 1)
        return tgt, anchors


def retrieved_anchors(boxes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, K, 4) neighbour crops (cxcywh) -> (B, K + 1, 4) anchors: each crop, then their median.

    The median is per coordinate, over the neighbours that have a crop (the lower middle value
    for an even count); a neighbour without a crop takes that median; with none, the whole photo.
    """
    if mask is None:
        mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    present = mask[..., None].expand_as(boxes)
    ordered = torch.where(present, boxes, torch.full_like(boxes, 2.0)).sort(dim=1).values
    count = mask.sum(1)  # (B,)
    middle = ((count - 1).clamp(min=0) // 2)[:, None, None].expand(-1, 1, 4)
    median = ordered.gather(1, middle).squeeze(1)  # (B, 4)
    whole = torch.tensor([0.5, 0.5, 1.0, 1.0], device=boxes.device, dtype=boxes.dtype)
    median = torch.where((count > 0)[:, None], median, whole.expand_as(median))
    filled = torch.where(present, boxes, median[:, None].expand_as(boxes))
    return torch.cat([filled, median[:, None]], 1).clamp(EPS, 1 - EPS)


def _no_pad(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)


def _required(x: torch.Tensor | None, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"this model needs `{name}` in its inputs")
    return x


def build_model(config: ModelConfig, load_backbone_weights: bool = False) -> ProCrop:
    """A ProCrop model for `config`; backbone weights are loaded only when asked (training)."""
    return ProCrop(config, build_backbone(config, load_weights=load_backbone_weights))
