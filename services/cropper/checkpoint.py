"""Model checkpoints: `model.safetensors` (weights) + `config.json` (ModelConfig and provenance),
plus `trainer.pt` (optimizer, scheduler, epoch) for resuming. A checkpoint lives in a folder or
under an object-store prefix (`s3://bucket/prefix`); both go through `ObjectStore`.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.cropper.config import ModelConfig, model_config
from services.cropper.model import ProCrop, build_model
from shared.checkpoints import CHECKPOINT_FORMAT, CONFIG, open_location, read_config_json
from shared.checkpoints import location_key as _key
from shared.errors import ModelLoadError, ObjectNotFoundError
from shared.storage import ObjectStore

WEIGHTS, TRAINER = "model.safetensors", "trainer.pt"
__all__ = ["open_location"]  # checkpoint locations live in shared.checkpoints
FORMAT = CHECKPOINT_FORMAT


def read_config(store: ObjectStore, prefix: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, provenance info) of the checkpoint under `prefix`."""
    return model_config(*read_config_json(store, prefix), store.uri(_key(prefix, CONFIG)))


def save_checkpoint(
    store: ObjectStore,
    prefix: str,
    model: ProCrop,
    info: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> None:
    """Write weights, then config (so a config never points at missing weights), then state."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    store.put(_key(prefix, WEIGHTS), st_save(weights, metadata={"format": FORMAT}))
    config = {"format": FORMAT, "model": model.config.to_dict(), "info": info or {}}
    store.put(_key(prefix, CONFIG), json.dumps(config, indent=2).encode(), "application/json")
    if trainer_state is not None:
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        store.put(_key(prefix, TRAINER), buffer.getvalue())


def load_checkpoint(store: ObjectStore, prefix: str) -> tuple[ProCrop, dict[str, Any]]:
    """Rebuild the model from its config and load its weights strictly (eval mode)."""
    config, info = read_config(store, prefix)
    model = build_model(config)
    try:
        weights = st_load(store.get(_key(prefix, WEIGHTS)))
    except ObjectNotFoundError:
        raise ModelLoadError(f"no weights at {store.uri(_key(prefix, WEIGHTS))}") from None
    except Exception as exc:  # safetensors' own error types on bad bytes
        raise ModelLoadError(f"{store.uri(_key(prefix, WEIGHTS))}: unreadable ({exc})") from None
    load_weights(model, weights, store.uri(prefix))
    return model.eval(), info


def load_weights(model: ProCrop, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line error that says what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        example = (missing + unexpected + wrong)[0]
        raise ModelLoadError(
            f"{source}: weights do not match the model config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped, e.g. {example})"
        )
    model.load_state_dict(weights)


def read_trainer_state(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    """The resume state, or None when the checkpoint has none."""
    if not store.exists(_key(prefix, TRAINER)):
        return None
    return torch.load(io.BytesIO(store.get(_key(prefix, TRAINER))), weights_only=True)
