"""Backbones: photo pixels -> a (B, C, h, w) feature map for the Conditional-DETR encoder.

- `lite`: a small CNN trained from scratch (stride 16, about 0.7 M parameters), whose output is
  joined with the weight-free cue maps of the `lite` composition descriptor (saliency, focus,
  edges, tone on the 8 x 8 grid), so the model starts from cues it does not have to learn.
- `features`: the composition encoder's own (64, C) feature cells (the frozen ImageNet
  EfficientNet-Lite0 of `services/embedder/pretrained.py`), reshaped to the 8 x 8 grid.
- `resnet50` / `resnet18` / `resnet_tiny`: torchvision ResNets up to layer4 (stride 32) with frozen
  batch norm, as in DETR. `backbone_weights` is a local file (a torchvision state dict, `.pth` or
  `.safetensors`), "imagenet" (torchvision's weights, when the machine can load them), or None.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from services.cropper.config import ModelConfig
from services.embedder.base import GRID
from shared.errors import ModelLoadError

log = logging.getLogger(__name__)


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)
    )


class _Stage(nn.Module):
    """Strided 3x3 conv, then one residual 3x3 block."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = _conv_bn(c_in, c_out, stride=2)
        self.block = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return F.relu(x + self.block(x))


class LiteBackbone(nn.Module):
    """(B, 3, S, S) normalized pixels + (B, 64, cue_channels) cue tokens -> (B, C, S/16, S/16)."""

    widths = (24, 48, 96, 160)

    def __init__(self, cue_channels: int = 16) -> None:
        super().__init__()
        stem, *rest = self.widths
        self.stem = _conv_bn(3, stem, stride=2)
        self.stages = nn.Sequential(*(_Stage(a, b) for a, b in itertools.pairwise(self.widths)))
        self.cue_channels = cue_channels
        self.num_channels = rest[-1] + cue_channels

    def forward(self, images: torch.Tensor, cues: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stages(self.stem(images))  # (B, 160, S/16, S/16)
        if not self.cue_channels:
            return x
        if cues is None:
            raise ValueError("the lite backbone needs the cue tokens of each photo")
        grid = cues.transpose(1, 2).unflatten(2, (GRID, GRID))  # (B, C, 8, 8)
        if grid.shape[-2:] != x.shape[-2:]:
            grid = F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, grid], dim=1)


class FeatureBackbone(nn.Module):
    """The composition encoder's own feature cells as the image features: (B, 64, C) -> (B, C, 8, 8).

    With a frozen pretrained encoder (`effnet`: ImageNet EfficientNet-Lite0) the network runs once
    per photo, for retrieval and for the crop model alike, and training views are encoded once
    (`services.cropper.views`), so the crop model trains on a CPU in minutes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.num_channels = channels

    def forward(
        self, images: torch.Tensor | None, cues: torch.Tensor | None = None
    ) -> torch.Tensor:
        if cues is None:
            raise ValueError("the features backbone needs each photo's feature cells (`cues`)")
        return cues.transpose(1, 2).unflatten(2, (GRID, GRID))


class ResNetBackbone(nn.Module):
    """torchvision ResNet body with frozen batch norm: (B, 3, S, S) -> (B, C, S/32, S/32)."""

    def __init__(self, body: resnet.ResNet) -> None:
        super().__init__()
        self.body = nn.Sequential(*list(body.children())[:-2])  # drop avgpool and fc
        self.num_channels = body.fc.in_features

    def forward(self, images: torch.Tensor, cues: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(images)


def _resnet(name: str) -> resnet.ResNet:
    norm = FrozenBatchNorm2d
    if name == "resnet50":
        return resnet.resnet50(weights=None, norm_layer=norm)
    if name == "resnet18":
        return resnet.resnet18(weights=None, norm_layer=norm)
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm)  # resnet_tiny


def load_resnet_weights(body: resnet.ResNet, name: str, weights: str) -> None:
    """Load `weights` ("imagenet" or a file) into `body`; a file that does not fit raises."""
    if weights == "imagenet":
        try:
            enum = resnet.ResNet50_Weights if name == "resnet50" else resnet.ResNet18_Weights
            state = enum.DEFAULT.get_state_dict(progress=False)
        except Exception as exc:  # no network or no cache: train from scratch
            log.warning(
                "ImageNet weights for %s unavailable (%s); starting from scratch", name, exc
            )
            return
    else:
        state = _read_state_dict(Path(weights))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:  # load_state_dict would raise a multi-line RuntimeError, even with strict=False
        raise ModelLoadError(
            f"backbone weights {weights} do not fit {name}: {len(wrong)} mis-shaped (e.g. {wrong[0]})"
        )
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ModelLoadError(
            f"backbone weights {weights} do not fit {name}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected (e.g. {(missing + unexpected)[0]})"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"backbone weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a load error
        raise ModelLoadError(f"cannot read backbone weights {path}: {exc}") from None


def build_backbone(
    config: ModelConfig, load_weights: bool = True
) -> LiteBackbone | FeatureBackbone | ResNetBackbone:
    """The backbone named by `config`; weights are loaded only when `load_weights` (training)."""
    if config.backbone == "lite":
        return LiteBackbone(cue_channels=config.cue_channels)
    if config.backbone == "features":
        return FeatureBackbone(config.cue_channels)
    body = _resnet(config.backbone)
    if load_weights and config.backbone_weights:
        load_resnet_weights(body, config.backbone, config.backbone_weights)
    return ResNetBackbone(body)
