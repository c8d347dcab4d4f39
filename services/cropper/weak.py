"""Weak supervision on CAD: the paper's two-stage training, `procrop train` with a [weak] section.

    [weak]
    sources = ["runs/cad"]      # CAD runs: folders, labels.jsonl files or s3:// prefixes
    weights = [1.0]             # draw weight of each source's canvases
    human = false               # mix in the [data] annotations (human crops) ...
    human_weight = 1.0          # ... drawn with this weight
    stage1_fraction = 0.2       # stage 1: the first 20% of epochs
    rounds = 2                  # stage 2: rounds of pseudo-labels over the remaining epochs
    k = 8                       # curation (services/cropper/pseudo_labels.py)
    predict = "local"           # or "queue": batch prediction on the crop workers

Steps: 1. gather the sources into one training set (`weak_data.assemble`), index it and compute
relations (`dataset_io.prepare`: the composition index holds the canvases with their regions);
2. stage 1: epochs on views that contain each canvas's original region, labelled with it;
3. stage 2, round r = 1..R: the current model predicts every CAD canvas (in this process, or as
`procrop.crop.batch` tasks on the crop queue), `curate` keeps its top-k proposals, the round is
written to `{out}/labels/round-{r}.jsonl` with its statistics, and the round's epochs train on
those labels (a canvas left with no proposal keeps its region). Checkpoints are written every
epoch as in supervised training; a rerun resumes at the last epoch and reads the rounds already
written, so it resumes at its last round. Weak runs are single-process (no DDP).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from services.cropper import dataset_io
from services.cropper.checkpoint import open_location, read_trainer_state
from services.cropper.data import Augment, CropDataset, TrainPhoto, collate
from services.cropper.engine import predict, train_one_epoch
from services.cropper.loss import SetCriterion
from services.cropper.model import ProCrop, build_model
from services.cropper.pseudo_labels import CurationConfig, curate, round_stats
from services.cropper.weak_data import (
    HUMAN,
    Assembled,
    assemble,
    read_round,
    relabel_views,
    sampling_weights,
    write_round,
)
from shared.devices import resolve_device
from shared.errors import ProCropError
from shared.settings import Settings

log = logging.getLogger(__name__)
Labels = dict[str, tuple[np.ndarray, np.ndarray]]  # canvas -> (M, 4) pixel xyxy, (M,) scores


@dataclass(frozen=True)
class WeakConfig:
    """The [weak] section (see the module docstring)."""

    sources: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # default: 1 per source
    human: bool = False
    human_weight: float = 1.0
    stage1_fraction: float = 0.2
    rounds: int = 2
    curation: CurationConfig = field(default_factory=CurationConfig)
    proposals: int = 24  # crops asked of the model per canvas before curation
    predict: str = "local"  # local | queue
    batch_size: int = 32  # canvases per crop-queue task
    timeout_s: float = 3600  # a queue round waits this long for its parts

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WeakConfig:
        raw = dict(raw)
        curation = {k: raw.pop(k) for k in list(raw) if k in _CURATION_KEYS}
        for name in ("sources", "weights"):
            if name in raw:
                raw[name] = tuple(raw[name])
        config = cls(curation=CurationConfig(**curation), **raw)
        config.check()
        return config

    def check(self) -> None:
        if not self.sources:
            raise ProCropError("weak.sources: give at least one CAD run")
        if self.weights and len(self.weights) != len(self.sources):
            raise ProCropError(f"weak.weights: one per source ({len(self.sources)})")
        if any(w <= 0 for w in (*self.weights, self.human_weight)):
            raise ProCropError("weak.weights and weak.human_weight must be positive")
        if not 0 < self.stage1_fraction < 1 or self.rounds < 1:
            raise ProCropError("weak: stage1_fraction in (0, 1) and rounds >= 1")
        if self.predict not in ("local", "queue"):
            raise ProCropError(f"weak.predict: 'local' or 'queue', got {self.predict!r}")

    def source_weights(self) -> dict[str, float]:
        weights = self.weights or (1.0,) * len(self.sources)
        return {f"s{i}": w for i, w in enumerate(weights)} | {HUMAN: self.human_weight}


_CURATION_KEYS = {f.name for f in dataclasses.fields(CurationConfig)}


def schedule(epochs: int, stage1_fraction: float, rounds: int) -> list[int]:
    """The round of each epoch: 0 for stage 1 (at least one epoch), then rounds 1..R sharing the
    rest as evenly as possible (earlier rounds get the extra epochs)."""
    first = min(max(1, round(stage1_fraction * epochs)), epochs - 1)
    if epochs - first < rounds:
        raise ProCropError(f"{epochs} epochs leave fewer than one per round ({rounds} rounds)")
    rest = np.array_split(np.arange(epochs - first), rounds)
    return [0] * first + [r + 1 for r, part in enumerate(rest) for _ in part]


def train_weak(
    config: Any,
    settings: Settings,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a weak training run; `config` is a `TrainConfig` with `weak` set. Returns
    the last epoch's record with every round's statistics."""
    weak, optim = config.weak, config.optim
    torch.manual_seed(optim.seed)
    store, prefix = open_location(optim.out, settings, create=True)
    # 1. The training set: sources gathered, indexed, related.
    assembled, data = _prepare(config, settings)
    run = _Run(config, settings, assembled, data, store, prefix)
    rounds_of = schedule(optim.epochs, weak.stage1_fraction, weak.rounds)
    start = run.resume()
    record: dict[str, Any] = {"rounds": {}}
    started = time.monotonic()
    # 2-3. Stage 1, then the rounds: labels for each round, then its epochs.
    for epoch in range(start, optim.epochs):
        r = rounds_of[epoch]
        if r != run.round:
            record["rounds"][r] = run.enter_round(r)
        record |= run.train_epoch(epoch)
        if on_epoch:
            on_epoch(record)
        if on_round and (epoch + 1 == optim.epochs or rounds_of[epoch + 1] != r):
            on_round(r, record)
        if optim.max_minutes is not None and (time.monotonic() - started) / 60 >= optim.max_minutes:
            break
    return record


def _prepare(config: Any, settings: Settings) -> tuple[Assembled, dataset_io.PreparedData]:
    weak, data = config.weak, config.data
    folder = _work_folder(config.optim.out, settings)
    human = (data.annotations, data.format, data.images) if weak.human and data else None
    if weak.human and not data:
        raise ProCropError("weak.human = true needs a [data] section (the human annotations)")
    assembled = assemble(list(weak.sources), human, folder, settings)
    combined = dataset_io.DataConfig(
        annotations=str(assembled.annotations), format="jsonl", images=str(folder), split="all",
        collection=data.collection if data else "weak_train", relations=str(folder / "relations.json"),
    )  # fmt: skip
    return assembled, dataset_io.prepare(combined, config.model, settings, str(folder))


def _work_folder(out: str, settings: Settings) -> Path:
    """Where the gathered training set lives: OUT/weak for a folder, else under PROCROP_HOME."""
    if "://" not in out:
        return Path(out) / "weak"
    return settings.home / "weak" / hashlib.sha256(out.encode()).hexdigest()[:16]


class _Run:
    """One weak run's state: model, optimizer, views and the current round's labels."""

    def __init__(self, config: Any, settings: Settings, assembled: Assembled,
                 data: dataset_io.PreparedData, store: Any, prefix: str) -> None:  # fmt: skip
        from services.cropper.train import _views, build_optimizer

        self.config, self.settings, self.assembled = config, settings, assembled
        self.store, self.prefix = store, prefix
        self.collection = config.data.collection if config.data else "weak_train"
        self.photos = data.train
        self.cad_index = [i for i, p in enumerate(self.photos) if p.name in assembled.cad]
        self.device = resolve_device(config.optim.device)
        self.model = build_model(config.model, load_backbone_weights=True).to(self.device)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.stage1_views, _ = _views(config, settings, dataclasses.replace(data, val=[]))
        self.views, self.labelled = self.stage1_views, self.photos
        self.criterion = SetCriterion(config.loss)
        self.round = 0
        names = [p.name for p in self.photos]
        self.draw = sampling_weights(names, assembled.source_of, config.weak.source_weights())

    def resume(self) -> int:
        from services.cropper.train import _resume

        state = read_trainer_state(self.store, _join(self.prefix, "last"))
        if state is None:
            return 0
        start, _ = _resume(self.model, self.optimizer, self.store, self.prefix, state)
        log.info("resuming the weak run at epoch %d", start)
        return start

    def enter_round(self, r: int) -> dict[str, Any]:
        """Round r's labels: read back if written, else predicted, curated and written."""
        labels = read_round(self.store, self.prefix, r) if r > 0 else None
        if r > 0 and labels is None:
            labels = self._curated(self._predict(r))
            stats = round_stats([labels[n][0] for n in sorted(labels)],
                                [self.assembled.cad[n].region for n in sorted(labels)])  # fmt: skip
            write_round(self.store, self.prefix, r, labels, self.assembled.cad, stats)
            log.info("round %d pseudo-labels: %s", r, json.dumps(stats))
        self.round = r
        if labels is not None:
            self._use(labels)
        return json.loads(self.store.get(_round_stats_key(self.prefix, r))) if r else {}

    def _predict(self, r: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every CAD canvas's proposals (pixel xyxy, scores), from the current model."""
        cad = [self.photos[i] for i in self.cad_index]
        if self.config.weak.predict == "queue":
            from services.cropper.batch_crops import predict_on_queue

            return predict_on_queue(self, r, cad)
        views = self.stage1_views
        cells = [views.features[i, 0] for i in self.cad_index] if views is not None else None
        sizes = [(self.assembled.cad[p.name].width, self.assembled.cad[p.name].height) for p in cad]
        return predict_local(self.model, cad, sizes, self.config.weak.proposals, cells)

    def _curated(self, proposals: dict[str, tuple[np.ndarray, np.ndarray]]) -> Labels:
        out = {}
        for name, (boxes, scores) in proposals.items():
            kept = curate(boxes, scores, self.assembled.cad[name].region, self.config.weak.curation)
            out[name] = kept
        return out

    def _use(self, labels: Labels) -> None:
        """Train on `labels` from now on (a canvas with none keeps its region)."""
        photos, norm = list(self.photos), []
        for i in self.cad_index:
            photo, image = self.photos[i], self.assembled.cad[self.photos[i].name]
            boxes, _ = labels.get(photo.name, (np.zeros((0, 4)), None))
            size = np.array([image.width, image.height] * 2, np.float64)
            crops = boxes / size if len(boxes) else photo.crops
            photos[i] = dataclasses.replace(photo, crops=crops, weights=np.ones(len(crops)))
            norm.append(crops)
        self.labelled = photos
        if self.stage1_views is not None:
            self.views = relabel_views(self.stage1_views, self.cad_index, norm)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        from services.cropper.train import _after_epoch, scheduled_batches

        o = self.config.optim
        augment = Augment(o.window_prob, o.flip_prob)
        dataset = CropDataset(self.labelled, self.config.model, augment, o.seed, self.views)
        dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(o.seed * 1000 + epoch)
        sampler = WeightedRandomSampler(self.draw.tolist(), len(dataset), generator=generator)
        loader = DataLoader(dataset, batch_size=o.batch_size, sampler=sampler, collate_fn=collate,
                            drop_last=len(dataset) > o.batch_size)  # fmt: skip
        device = self.device
        losses = train_one_epoch(self.model, self.criterion,
                                 scheduled_batches(loader, self.optimizer, o, epoch),
                                 self.optimizer, device, o.grad_clip)  # fmt: skip
        record = {"epoch": epoch + 1, "round": self.round, "train": losses}
        empty = DataLoader(CropDataset([], self.config.model), collate_fn=collate)
        _after_epoch(
            self.model, empty, device, self.store, self.prefix, self.optimizer, record, -1.0
        )
        return record


def predict_local(
    model: ProCrop,
    photos: list[TrainPhoto],
    sizes: list[tuple[int, int]],
    proposals: int,
    cells: list[np.ndarray] | None = None,
    batch_size: int = 64,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Batch prediction in this process: each photo's (working copy, neighbours, or its encoded
    (64, C) cells) crops as `procrop crop` returns them, up to `proposals`, pixel xyxy in the
    photo of size `sizes[i]`, best first."""
    from services.cropper.inputs import PhotoArrays, batch_arrays, photo_arrays
    from services.cropper.model import CropInputs
    from services.cropper.postprocess import select_crops
    from services.cropper.pseudo_labels import round_request

    config, request, out = model.config, round_request(proposals), {}
    for start in range(0, len(photos), batch_size):
        part = photos[start : start + batch_size]
        arrays = [
            PhotoArrays(None, math.log(sizes[start + j][0] / sizes[start + j][1]), cells[start + j])
            if cells is not None else photo_arrays(p.image, config)
            for j, p in enumerate(part)
        ]  # fmt: skip
        neighbors = [p.neighbors for p in part] if config.use_retrieval else None
        inputs = CropInputs.from_arrays(batch_arrays(arrays, neighbors))  # type: ignore[arg-type]
        scores, boxes = predict(model, inputs.to(next(model.parameters()).device))
        for j, photo in enumerate(part):
            w, h = sizes[start + j]
            result = select_crops(scores[j], boxes[j], w, h, request)
            out[photo.name] = (
                np.asarray([c.box for c in result.crops], np.float64).reshape(-1, 4),
                np.asarray([c.score for c in result.crops], np.float64),
            )
    return out


def _round_stats_key(prefix: str, r: int) -> str:
    from services.cropper.weak_data import round_key

    return round_key(prefix, r, "json")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name
