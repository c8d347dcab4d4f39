"""Does fine-tuning the encoder pay? 5-fold CV of the shipped model with EfficientNet-Lite0's
last stage (its block 7, head convolution and batch norm: 1.0 M parameters) trained with the
crop head, at the paper's backbone : head learning-rate ratio of 1 : 10 (3e-5 against the head's
3e-4), against the shipped model whose encoder is frozen.

Only the last stage is tuned: on 2 CPU cores a full fine-tune costs 140 ms a photo per step
(forward and backward at 256 px, batch 16), 20 minutes more per fold of 8 epochs, and the encoded
views could no longer be reused. The network up to block 6 stays frozen, so its (192, 8, 8) maps
of the same 8 views per photo (the same draws as the frozen cache) are encoded once; the tuned
stage runs inside the crop model. Retrieval is unchanged (the frozen encoder's tokens). Batch
norm keeps ImageNet's statistics. Result (README): no gain over 3 folds, so not shipped.

    PROCROP_HOME=runs/cv-home .venv/bin/python -m benchmarks.cv_finetune [--lr-backbone 3e-5]

Folds, seed, neighbours, training and scoring are `benchmarks.cv_crop_models`'s; rows are
comparable with its "ProCrop effnet + retrieval" rows, fold by fold. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmarks.common import FCDB, emit
from benchmarks.cv_crop_models import CONFIG, Corpus, _photo, load_corpus, score, train_and_predict
from services.cropper.model import build_model
from services.cropper.train import load_train_config
from services.cropper.views import encode_views
from services.embedder.base import Embedding
from services.embedder.pretrained import WEIGHTS_SHA256, load_efficientnet_lite0, pixels
from shared.images import decode_image, read_bytes
from shared.settings import load_settings

TUNED_STAGE = 6  # timm's blocks[6]: EfficientNet-Lite0's last stage, 192 -> 320 channels at 8 x 8


class TrunkEncoder:
    """The frozen network up to the tuned stage: photos -> (B, 64, 192) cells (encode_views'
    encoder protocol: `name`, `features_version`, `encode(images).features`)."""

    name = "effnet-trunk"
    features_version = f"s256-blocks{TUNED_STAGE}-{WEIGHTS_SHA256[:12]}"
    version = features_version

    def __init__(self, net: nn.Module) -> None:
        self.trunk = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:TUNED_STAGE]).eval()

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> SimpleNamespace:
        maps = torch.cat(
            [
                self.trunk(torch.from_numpy(pixels(images[i : i + 16])))
                for i in range(0, len(images), 16)
            ]
        )
        return SimpleNamespace(features=maps.flatten(2).transpose(1, 2).numpy())


class TunedStage(nn.Module):
    """The crop model's backbone: (B, 64, 192) trunk cells -> EfficientNet-Lite0's last stage,
    head conv and batch norm -> (B, 1280, 8, 8), the frozen encoder's features once tuned."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stage, self.conv_head, self.bn2 = net.blocks[TUNED_STAGE], net.conv_head, net.bn2
        self.num_channels = net.num_features

    def forward(
        self, images: torch.Tensor | None, cues: torch.Tensor | None = None
    ) -> torch.Tensor:
        assert cues is not None
        side = round(cues.shape[1] ** 0.5)
        maps = cues.transpose(1, 2).unflatten(2, (side, side))
        return self.bn2(self.conv_head(self.stage(maps)))

    def train(self, mode: bool = True) -> TunedStage:
        return super().train(False)  # batch-norm statistics stay ImageNet's; no drop-path


def with_tuned_stage(config) -> nn.Module:
    model = build_model(config)
    model.backbone = TunedStage(load_efficientnet_lite0())  # a fresh ImageNet copy per fold
    return model


def trunk_corpus(corpus: Corpus, fcdb, views: int, seed: int) -> Corpus:
    """`corpus` with the trunk's cells in place of the frozen features (originals and views)."""
    encoder = TrunkEncoder(load_efficientnet_lite0())
    originals = [
        encoder.encode([decode_image(read_bytes(fcdb / n), n)]).features[0] for n in corpus.names
    ]
    photos = [_photo(n, corpus.copies[i], corpus.crops[i]) for i, n in enumerate(corpus.names)]
    cached = encode_views(photos, encoder, views, seed, cache_dir=load_settings().home / "cache")
    effnet = Embedding(corpus.effnet.tokens, corpus.effnet.vectors, np.stack(originals))
    return dataclasses.replace(corpus, effnet=effnet, views=cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr-backbone", type=float, default=3e-5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_train_config(CONFIG)
    optim = dataclasses.replace(config.optim, lr_backbone=args.lr_backbone)
    started = time.perf_counter()
    frozen = load_corpus(FCDB, optim.views, optim.seed, config.model)
    corpus = trunk_corpus(frozen, FCDB, optim.views, optim.seed)
    encode_s = time.perf_counter() - started
    n = len(corpus.names)
    folds = np.array_split(np.random.default_rng(args.seed).permutation(n), args.folds)
    per_fold, seconds = [], []
    for f in args.fold if args.fold is not None else range(args.folds):
        val = np.sort(folds[f])
        train = np.sort(np.concatenate([folds[j] for j in range(args.folds) if j != f]))
        t = time.perf_counter()
        ranked = train_and_predict(
            corpus, train, val, config.model, config.loss, optim, build=with_tuned_stage
        )
        seconds.append(time.perf_counter() - t)
        per_fold.append(score(corpus, val, ranked[""]))
        print(f"fold {f}: {per_fold[-1]} ({seconds[-1]:.0f} s)", flush=True)
    rows = {m: {"mean": round(float(np.mean([p[m] for p in per_fold])), 4),
                "std": round(float(np.std([p[m] for p in per_fold])), 4),
                "folds": [round(p[m], 4) for p in per_fold]} for m in per_fold[0]}  # fmt: skip
    emit("cv_finetune", {"photos": n, "lr_backbone": args.lr_backbone, "lr_head": optim.lr,
                         "epochs": optim.epochs, "encode_seconds": round(encode_s, 1),
                         "seconds_per_fold": round(float(np.median(seconds)), 1), "scores": rows})  # fmt: skip


if __name__ == "__main__":
    main()
