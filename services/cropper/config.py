"""Crop-model hyperparameters: one dataclass, with named profiles (`lite`, `paper`, `tiny`).

A checkpoint stores its `ModelConfig` as JSON next to the weights, so a model is always rebuilt
with the shape it was trained with; `ModelConfig.from_dict` refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared.checkpoints import CHECKPOINT_FORMAT, parse_config
from shared.errors import ModelLoadError, ProCropError

BACKBONES = ("lite", "features", "resnet50", "resnet18", "resnet_tiny")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a ProCrop model. Defaults are the `lite` profile (CPU, trained from scratch)."""

    profile: str = "lite"
    encoder: str = "lite"  # composition encoder of its retrieval (services/embedder/registry.py)
    backbone: str = "lite"  # one of BACKBONES; "features": the encoder's own feature cells
    backbone_weights: str | None = None  # ResNet: a .pth/.safetensors path, "imagenet" or None
    input_size: int = 128  # photos are resized to input_size x input_size (aspect fed separately)
    hidden_dim: int = 128  # d_model of the encoder, fusion and decoder
    num_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 3
    ffn_dim: int = 256
    dropout: float = 0.1
    num_queries: int = 24  # N learnable anchors (the reference code uses 90)
    k: int = 10  # retrieved compositions per photo
    token_dim: int = 16  # width of the composition tokens R_i (16 lite, 256 SAM)
    use_retrieval: bool = True  # f_R branch (composition tokens of the K neighbours)
    use_annotations: bool = True  # neighbours' crops as extra tokens and anchors (paper Table 5)
    use_text: bool = False  # f_M branch (BLIP multimodal embedding)
    text_dim: int = 768  # width of BLIP's multimodal tokens
    # lite backbone: weight-free cue maps joined to the CNN features (0 = off); "features"
    # backbone: the width of the encoder's feature cells, which are the image features
    cue_channels: int = 16
    # Post-processing of a model that retrieves: the best-scored proposal moves this far toward
    # the neighbours' median crop (0 = not at all; 0.5, their mean, for the lite-effnet profile,
    # chosen by 5-fold CV: benchmarks/cv_crop_models.py). Not a weight of the network.
    transfer_weight: float = 0.0
    # ... toward the median crop of this many nearest photos (0: the model's k). The model still
    # reads k; the median of more is steadier (5-fold CV: benchmarks/cv_crop_models.py).
    transfer_k: int = 0
    # ... and the alternatives after the best crop are the proposals that best cover those
    # nearest photos' crops (minimum Bayes risk for best-of-n IoU; 5-fold CV:
    # benchmarks/cv_crop_models.py), not the next best scored.
    cover_alternatives: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ProCropError(f"unknown backbone {self.backbone!r}: one of {', '.join(BACKBONES)}")
        if self.backbone == "features" and not self.cue_channels:
            raise ProCropError("the features backbone needs cue_channels (the feature width)")
        if self.hidden_dim % self.num_heads:
            raise ProCropError("hidden_dim must be a multiple of num_heads")
        if not 0.0 <= self.transfer_weight <= 1.0:
            raise ProCropError("model config: transfer_weight must be in [0, 1]")
        if not 0 <= self.transfer_k <= 1000:
            raise ProCropError("model config: transfer_k must be in [0, 1000]")
        if not isinstance(self.cover_alternatives, bool):
            raise ProCropError("model config: cover_alternatives must be true or false")
        for name in ("input_size", "num_queries", "k", "token_dim", "dec_layers"):
            if getattr(self, name) <= 0:
                raise ProCropError(f"model config: {name} must be positive")

    @property
    def num_anchor_queries(self) -> int:
        """Queries anchored on retrieved crops: one per neighbour plus their median."""
        return self.k + 1 if self.use_retrieval and self.use_annotations else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProCropError(f"unknown model config keys: {', '.join(unknown)}")
        if "encoder" not in data:  # written before models named their encoder
            data = {**data, "encoder": "sam" if data.get("profile") == "paper" else "lite"}
        return cls(**data)


@dataclass(frozen=True)
class LossConfig:
    """Matching costs and loss weights (the paper's, after Conditional DETR)."""

    cost_score: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    weight_score: float = 2.0
    weight_l1: float = 5.0
    weight_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    soft_iou: float = 0.85  # unmatched proposals this close to a ground truth get a soft target
    aux_loss: bool = True  # supervise every decoder layer
    # 1 = the paper's one-to-one matching. k > 1 matches each ground truth to k proposals
    # (H-DETR's one-to-many branch): more box supervision per photo, for small datasets.
    match_copies: int = 1


__all__ = ["CHECKPOINT_FORMAT", "config_from_json"]


def config_from_json(data: bytes, source: str) -> tuple[ModelConfig, dict[str, Any]]:
    """A checkpoint's `config.json` -> (ModelConfig, provenance info); errors name `source`."""
    return model_config(*parse_config(data, source), source)


def model_config(
    model: dict[str, Any], info: dict[str, Any], source: str
) -> tuple[ModelConfig, dict[str, Any]]:
    """A config.json's `model` object -> ModelConfig (errors name `source`), with `info`."""
    try:
        return ModelConfig.from_dict(model), info
    except (ProCropError, TypeError) as exc:
        raise ModelLoadError(f"{source}: {exc}") from None


PROFILES: dict[str, ModelConfig] = {
    "lite": ModelConfig(),
    # The lite profile on the pretrained encoder: frozen ImageNet EfficientNet-Lite0 cells (64, 1280)
    # as image features, its 32-d tokens for the neighbours (configs/lite.toml).
    "lite-effnet": ModelConfig(
        encoder="effnet", backbone="features", cue_channels=1280, token_dim=32, transfer_weight=0.5,
        transfer_k=30, cover_alternatives=True,
    ),
    "paper": ModelConfig(
        profile="paper", encoder="sam", backbone="resnet50", backbone_weights="imagenet", input_size=512,
        hidden_dim=256, num_heads=8, enc_layers=6, dec_layers=6, ffn_dim=2048, num_queries=90,
        token_dim=256, use_text=True, cue_channels=0,
    ),
    # The paper's architecture at toy size, for tests: ResNet blocks, SAM-like tokens, BLIP text.
    "tiny": ModelConfig(
        profile="paper", encoder="sam", backbone="resnet_tiny", input_size=64, hidden_dim=32, num_heads=2,
        enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=8, k=3, token_dim=32, use_text=True,
        text_dim=32, cue_channels=0, dropout=0.0,
    ),
}  # fmt: skip


def profile_config(name: str, **overrides: Any) -> ModelConfig:
    """The named profile's config with `overrides` applied."""
    if name not in PROFILES:
        raise ProCropError(f"unknown model profile {name!r}: one of {', '.join(PROFILES)}")
    return dataclasses.replace(PROFILES[name], **overrides)
