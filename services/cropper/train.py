"""`procrop train`: the crop model's training run, configured by a TOML file.

    [data]   annotations, format, images, split, collection, relations, ...   (DataConfig)
    [model]  profile and ModelConfig overrides                                 (ModelConfig)
    [loss]   LossConfig overrides
    [train]  epochs, batch size, learning rates, time budget, ...            (OptimConfig)
    [weak]   CAD sources, stages, rounds, curation ([data] optional)   (services/cropper/weak.py)

Steps: 1. read the annotations and split them; 2. make sure the training photos are in the
composition index and the query -> top-K relations exist (#2's ingest and relations, computed only
when missing); 3. load working copies and neighbours; 4. train, evaluating on the validation split
after each epoch; 5. checkpoint `last/` every epoch and `best/` on the best validation IoU, to a
folder or an s3:// prefix. Re-running the same command resumes from `last/`. Under `torchrun`,
training is data-parallel (DDP); rank 0 evaluates and writes.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from services.cropper import dataset_io
from services.cropper.checkpoint import open_location, read_trainer_state, save_checkpoint
from services.cropper.config import LossConfig, ModelConfig, profile_config
from services.cropper.data import Augment, CropDataset, collate
from services.cropper.engine import evaluate, train_one_epoch
from services.cropper.loss import SetCriterion
from services.cropper.model import ProCrop, build_model
from shared.devices import resolve_device
from shared.errors import ProCropError
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Optimization. Defaults are the paper's (AdamW, lr 1e-4, backbone 1e-5, wd 1e-4)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    warmup_steps: int = 200
    max_minutes: float | None = None  # stop after the epoch that passes this budget
    window_prob: float = 0.5
    flip_prob: float = 0.5
    views: int = 8  # features backbone: views per photo encoded once (services/cropper/views.py)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    out: str = "runs/crop"  # folder or s3://bucket/prefix


@dataclass(frozen=True)
class TrainConfig:
    data: dataset_io.DataConfig | None  # None only for a weak run on CAD alone
    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    weak: Any = None  # services.cropper.weak.WeakConfig: weak supervision on CAD


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a TOML training config; unknown keys and missing sections are errors."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProCropError(f"{path}: cannot read training config ({exc})") from None
    unknown = sorted(set(raw) - {"data", "model", "loss", "train", "weak"})
    if unknown or ("data" not in raw and "weak" not in raw):
        raise ProCropError(
            f"{path}: sections are [data] (or [weak]), [model], [loss], [train], [weak] ({unknown})"
        )
    model = dict(raw.get("model", {}))
    try:
        return TrainConfig(
            data=dataset_io.DataConfig(**raw["data"]) if "data" in raw else None,
            model=profile_config(model.pop("profile", "lite"), **model),
            loss=LossConfig(**raw.get("loss", {})),
            optim=OptimConfig(**raw.get("train", {})),
            weak=_weak(raw["weak"]) if "weak" in raw else None,
        )
    except (TypeError, ValueError) as exc:
        raise ProCropError(f"{path}: {exc}") from None


def _weak(raw: dict[str, Any]) -> Any:
    from services.cropper.weak import WeakConfig

    return WeakConfig.from_dict(raw)


def train(
    config: TrainConfig,
    settings: Settings,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) training; returns the last epoch's record."""
    if config.weak is not None:
        from services.cropper.weak import train_weak

        return train_weak(config, settings, on_epoch)
    assert config.data is not None, "a supervised run has a [data] section"
    rank, world = _init_distributed()
    device = _device(config.optim.device, rank, world)
    torch.manual_seed(config.optim.seed)
    # 1-3. Annotations, split, index + relations, working copies with their neighbours.
    data = _prepare(config, settings, rank, world)
    store, prefix = open_location(config.optim.out, settings, create=True)
    model = build_model(config.model, load_backbone_weights=True).to(device)
    optimizer = build_optimizer(model, config.optim)
    state = read_trainer_state(store, _join(prefix, "last"))
    start, best = 0, -1.0
    if state is not None:
        start, best = _resume(model, optimizer, store, prefix, state)
        log.info("resuming at epoch %d (best val IoU %.4f)", start, best)
    net = DistributedDataParallel(model) if world > 1 else model
    train_views, val_views = _views(config, settings, data)
    loader = _loader(data.train, config, world, rank, train_views)
    val_set = CropDataset(data.val, config.model, views=val_views)
    val_loader = DataLoader(val_set, batch_size=32, collate_fn=collate)
    criterion = SetCriterion(config.loss)
    started, record = time.monotonic(), {}
    # 4-5. Epochs, evaluation, checkpoints.
    for epoch in range(start, config.optim.epochs):
        loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        losses = train_one_epoch(
            net, criterion, scheduled_batches(loader, optimizer, config.optim, epoch), optimizer, device,
            config.optim.grad_clip, on_step,
        )  # fmt: skip
        record = {"epoch": epoch + 1, "train": losses, "minutes": _minutes(started)}
        if rank == 0:
            best = _after_epoch(model, val_loader, device, store, prefix, optimizer, record, best)
            if on_epoch:
                on_epoch(record)
        if _out_of_time(config.optim, started):
            log.info(
                "time budget of %s min reached after epoch %d", config.optim.max_minutes, epoch + 1
            )
            break
    if world > 1:
        dist.destroy_process_group()
    return record


def _prepare(config: TrainConfig, settings: Settings, rank: int, world: int) -> Any:
    """Rank 0 builds the index and relations (a Milvus Lite file admits one process); the other
    ranks wait, then read the relations it wrote."""
    if rank > 0:
        dist.barrier()
    assert config.data is not None
    data = dataset_io.prepare(config.data, config.model, settings, config.optim.out)
    if rank == 0 and world > 1:
        dist.barrier()
    return data


def _views(config: TrainConfig, settings: Settings, data: Any) -> tuple[Any, Any]:
    """Encoded views of the training and validation photos (features backbone), else None."""
    if config.model.backbone != "features":
        return None, None
    from services.cropper.views import encode_views
    from services.embedder.registry import build_encoder

    encoder = build_encoder(settings.embedder, config.model.encoder)
    cache, o = settings.home / "cache", config.optim
    log.info("encoding %d views of %d photos", o.views, len(data.train))
    train_views = encode_views(
        data.train, encoder, o.views, o.seed, o.window_prob, o.flip_prob, cache
    )
    val_views = encode_views(data.val, encoder, 1, o.seed, cache_dir=cache) if data.val else None
    return train_views, val_views


def _after_epoch(
    model: ProCrop,
    val_loader: DataLoader,
    device: torch.device,
    store: Any,
    prefix: str,
    optimizer: torch.optim.Optimizer,
    record: dict[str, Any],
    best: float,
) -> float:
    """Evaluate, then write `best/` (if improved) and `last/` (with the resume state)."""
    if len(val_loader.dataset):  # type: ignore[arg-type]
        record["val"] = evaluate(model, val_loader, device)
    score = record.get("val", {}).get("iou", float(record["epoch"]))
    if score > best:
        best = score
        save_checkpoint(store, _join(prefix, "best"), model, info=record)
    state = {"epoch": record["epoch"], "best": best, "optimizer": optimizer.state_dict()}
    save_checkpoint(store, _join(prefix, "last"), model, info=record, trainer_state=state)
    record["best"] = best
    log.info("epoch %s %s", record["epoch"], record)
    return best


def _resume(
    model: ProCrop, optimizer: torch.optim.Optimizer, store: Any, prefix: str, state: dict
) -> tuple[int, float]:
    from services.cropper.checkpoint import load_checkpoint

    saved, _ = load_checkpoint(store, _join(prefix, "last"))
    if saved.config != model.config:
        raise ProCropError("the checkpoint in the output folder has another model config")
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), float(state["best"])


def build_optimizer(model: ProCrop, cfg: OptimConfig) -> torch.optim.Optimizer:
    backbone = [
        p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad
    ]
    rest = [
        p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad
    ]
    groups = [{"params": rest, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr_backbone}]
    for group in groups:
        group["base_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def scheduled_batches(
    loader: DataLoader, optimizer: torch.optim.Optimizer, cfg: OptimConfig, epoch: int
):
    """Yield batches, with a linear warm-up then cosine decay of every group's learning rate."""
    steps_per_epoch = len(loader)
    total = max(cfg.epochs * steps_per_epoch, 1)
    for i, batch in enumerate(loader):
        step = epoch * steps_per_epoch + i
        warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        decay = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total)).item())
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * warm * (0.05 + 0.95 * decay)
        yield batch


def _loader(photos: list, config: TrainConfig, world: int, rank: int, views: Any) -> DataLoader:
    augment = Augment(config.optim.window_prob, config.optim.flip_prob)
    dataset = CropDataset(photos, config.model, augment, seed=config.optim.seed, views=views)
    sampler: DistributedSampler | None = None
    if world > 1:
        sampler = DistributedSampler(dataset, world, rank, seed=config.optim.seed)
    generator = torch.Generator().manual_seed(config.optim.seed)
    return DataLoader(
        dataset, batch_size=config.optim.batch_size, shuffle=sampler is None, sampler=sampler,
        collate_fn=collate, num_workers=config.optim.num_workers, drop_last=len(dataset) > config.optim.batch_size,
        generator=generator, persistent_workers=config.optim.num_workers > 0,
    )  # fmt: skip


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def _device(name: str, rank: int, world: int) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _minutes(started: float) -> float:
    return round((time.monotonic() - started) / 60, 2)


def _out_of_time(cfg: OptimConfig, started: float) -> bool:
    return cfg.max_minutes is not None and _minutes(started) >= cfg.max_minutes
