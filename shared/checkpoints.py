"""Where crop models live, and what a model asks of the other services, read without its code.

A model location is a folder, an `s3://bucket/prefix`, or (lite) the bundle shipped inside the
`procrop` package. Every checkpoint has a `config.json`: `{"format", "model": {...}, "info"}`.
The retriever needs only three of its fields (profile, K, whether it retrieves), so it reads them
here as a `ModelCard` instead of importing the crop model's package; the cropper parses the whole
`model` object into its `ModelConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ModelLoadError, ObjectNotFoundError, ProCropError

if TYPE_CHECKING:  # storage is imported where a location is opened: the model core stays pure
    from shared.settings import Settings
    from shared.storage import ObjectStore

CONFIG = "config.json"
CHECKPOINT_FORMAT = "procrop-crop-model-v1"
INDEX_FILE = (
    "index.safetensors"  # a bundle's composition index (services/retriever/bundle_index.py)
)


def shipped_bundle(profile: str = "lite") -> Path:
    """The model bundle shipped in the package for `profile` (only lite has one)."""
    if profile != "lite":
        raise ProCropError(
            "the paper profile has no shipped model: give --model (or PROCROP_CROP__MODEL)"
        )
    return Path(str(resources.files("procrop.models") / "lite"))


def model_location(settings: Any, profile: str = "lite", model: str | None = None) -> str:
    """Where the crop model is: `model`, else PROCROP_CROP__MODEL, else the shipped bundle."""
    location = model or settings.crop.model
    return str(location) if location is not None else str(shipped_bundle(profile))


def bundle_index(location: str) -> Path | None:
    """The composition index of the bundle at `location`, if it is a local bundle that has one."""
    path = Path(location) / INDEX_FILE if "://" not in location else None
    return path if path is not None and path.is_file() else None


def open_location(
    location: str, settings: Settings | None = None, create: bool = False
) -> tuple[ObjectStore, str]:
    """A checkpoint location (folder or s3://bucket/prefix) -> (store, key prefix). A local
    folder is made only with `create` (where a run writes): looking for a model must not leave
    empty folders behind when there is none."""
    from shared.storage import LocalObjectStore, build_object_store, parse_s3_uri

    if location.startswith("s3://"):
        if settings is None or settings.storage.backend != "s3":
            raise ProCropError(f"{location}: set PROCROP_STORAGE__BACKEND=s3 to use an S3 location")
        bucket, prefix = parse_s3_uri(location)
        return build_object_store(settings, bucket=bucket), prefix.strip("/")
    if "://" in location:
        raise ProCropError(f"{location}: give a folder or an s3://bucket/prefix location")
    return LocalObjectStore(location, create=create), ""


def location_key(prefix: str, name: str) -> str:
    """The key of file `name` of a checkpoint under key prefix `prefix`."""
    return f"{prefix}/{name}" if prefix else name


def parse_config(data: bytes, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's `config.json` -> (its `model` object, its provenance `info`)."""
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: not JSON ({exc})") from None
    if not isinstance(parsed, dict) or parsed.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(f"{source}: not a {CHECKPOINT_FORMAT} config")
    if not isinstance(parsed.get("model"), dict):
        raise ModelLoadError(f"{source}: no model object")
    return parsed["model"], parsed.get("info", {})


def read_config_json(store: ObjectStore, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model object, info) of the checkpoint under `prefix`."""
    try:
        data = store.get(location_key(prefix, CONFIG))
    except ObjectNotFoundError:
        raise ModelLoadError(f"no crop model at {store.uri(prefix)} (missing {CONFIG})") from None
    return parse_config(data, store.uri(location_key(prefix, CONFIG)))


@dataclass(frozen=True)
class ModelCard:
    """What a crop model asks of the services before it: its profile and K neighbours (or none)."""

    location: str
    profile: str
    encoder: str  # the composition encoder its retrieval (and, for some, its backbone) reads
    k: int
    use_retrieval: bool
    transfer_k: int = 0  # the median crop of this many nearest photos is fused in (0: k)


def read_model_card(location: str, settings: Settings | None = None) -> ModelCard:
    """The `ModelCard` of the crop model at `location`."""
    model, _ = read_config_json(*open_location(location, settings))
    try:
        profile = str(model["profile"])
        encoder = str(model.get("encoder", "sam" if profile == "paper" else "lite"))
        return ModelCard(
            location, profile, encoder, int(model["k"]), bool(model["use_retrieval"]),
            int(model.get("transfer_k", 0)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{location}: config.json lacks {exc}") from None
