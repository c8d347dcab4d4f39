"""Training data preparation: annotations -> split -> composition index and relations -> photos.

The composition index holds the *training* photos only (with their crops), so a validation photo
never retrieves itself or its own crop; relations are computed for training and validation photos
alike. Photo files whose bytes occur more than once in the image folder are dropped from training:
FCDB train holds 34 Flickr "photo unavailable" placeholders, byte-identical, each labelled with a
crop of a different original.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from services.cropper.config import ModelConfig
from services.cropper.data import TrainPhoto
from services.cropper.inputs import work_side, working_copy
from services.retriever.neighbors import Neighbors, neighbors_from
from services.retriever.sources import PhotoRef
from shared.annotations import AnnotatedPhoto, fixed_split, load_annotations
from shared.errors import ProCropError
from shared.images import IMAGE_SUFFIXES, content_hash, decode_image, read_bytes
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    annotations: str  # FCDB .json, GAICD folder, or .jsonl
    format: str = "auto"  # fcdb | gaicd | jsonl | auto
    images: str | None = None  # image root (default: the annotations' folder)
    split: str = "train"  # train: all but the fixed validation split; all: no validation
    val_size: int = 200
    split_seed: int = 2026
    encoder: str | None = (
        None  # composition encoder (default: the model's own, ModelConfig.encoder)
    )
    collection: str = "crop_train"  # composition index of the training photos
    relations: str | None = None  # relations JSON (default: OUT/relations.json, made if missing)
    max_targets: int = 5  # graded datasets (GAICD): the best crops used as ground truths
    text_features: str | None = None  # safetensors {photo name: (L, D) BLIP tokens}


@dataclass(frozen=True)
class PreparedData:
    train: list[TrainPhoto]
    val: list[TrainPhoto]
    relations_path: str


def prepare(data: DataConfig, model: ModelConfig, settings: Settings, out: str) -> PreparedData:
    """Steps 1-3 of a training run (see `services.cropper.train`)."""
    root = Path(data.images or Path(data.annotations).parent)
    labels = load_annotations(data.annotations, data.format, image_root=root)
    if not labels:
        raise ProCropError(f"{data.annotations}: no usable annotations")
    if data.split not in ("train", "all"):
        raise ProCropError(f"data.split must be 'train' or 'all', got {data.split!r}")
    names = sorted(labels)
    train_names, val_names = (
        fixed_split(names, data.val_size, data.split_seed) if data.split == "train" else (names, [])
    )
    refs = {n: PhotoRef(n, str(root / n), partial(read_bytes, root / n)) for n in names}
    train_names = drop_repeated_files(train_names, root)
    rel_path = data.relations or str(Path(out if "://" not in out else ".") / "relations.json")
    relations = None
    if model.use_retrieval:
        relations = ensure_relations(
            data, model, settings, labels, refs, train_names, val_names, rel_path
        )
    text = _text_features(data.text_features) if model.use_text else None
    read_tokens = _token_reader(settings, relations) if relations is not None else None
    load = partial(_load_photo, root=root, labels=labels, model=model, data=data,
                   relations=relations, read_tokens=read_tokens, settings=settings, text=text)  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        train = list(pool.map(load, train_names))
        val = list(pool.map(load, val_names))
    log.info("training on %d photos, validating on %d", len(train), len(val))
    return PreparedData(train, val, rel_path)


def drop_repeated_files(names: list[str], root: Path) -> list[str]:
    """Names whose file bytes are unique within the image folder."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            by_hash[content_hash(path.read_bytes())].append(path.relative_to(root).as_posix())
    repeated = {n for group in by_hash.values() if len(group) > 1 for n in group}
    kept = [n for n in names if n not in repeated]
    if len(kept) < len(names):
        log.warning(
            "dropped %d training photos whose file occurs more than once", len(names) - len(kept)
        )
    return kept


def ensure_relations(
    data: DataConfig,
    model: ModelConfig,
    settings: Settings,
    labels: dict[str, AnnotatedPhoto],
    refs: dict[str, PhotoRef],
    train_names: list[str],
    val_names: list[str],
    path: str,
) -> dict:
    """Index the training photos (skipping those already in) and compute relations if missing."""
    from services.embedder.registry import build_encoder
    from services.retriever.ingest import Ingestor
    from services.retriever.relations import compute_relations, read_relations, write_relations
    from services.retriever.search import Retriever
    from shared.storage import build_object_store
    from shared.vector_index import open_index

    wanted = set(train_names) | set(val_names)
    if Path(path).is_file():
        relations = read_relations(path)
        if wanted <= set(relations["photos"]) and relations["k"] >= model.k:
            return relations
    encoder = build_encoder(settings.embedder, data.encoder or model.encoder)
    index, store = open_index(settings), build_object_store(settings)
    log.info("indexing %d training photos into %r", len(train_names), data.collection)
    ingestor = Ingestor(data.collection, encoder, index, store, labels, settings.max_image_pixels)
    ingestor.run([refs[n] for n in train_names])
    retriever = Retriever(data.collection, encoder, index)
    relations = compute_relations(retriever, [refs[n] for n in sorted(wanted)], k=model.k)
    write_relations(relations, path)
    return relations


TokenReader = Callable[[list[tuple[str, int]]], np.ndarray]


def neighbors_of(relations: dict, name: str, tokens: TokenReader, k: int) -> Neighbors:
    """A photo's K neighbours from the relations file, with their tokens."""
    entries = relations["photos"][name]["neighbors"][:k]
    grids = tokens([(e["tokens_key"], e["token_row"]) for e in entries])
    return neighbors_from(grids, [e["crop_norm"] for e in entries], k)


def _load_photo(
    name: str,
    *,
    root: Path,
    labels: dict[str, AnnotatedPhoto],
    model: ModelConfig,
    data: DataConfig,
    relations: dict | None,
    read_tokens: TokenReader | None,
    settings: Settings,
    text: dict[str, np.ndarray] | None,
) -> TrainPhoto:
    label = labels[name]
    photo = decode_image(read_bytes(root / name), name, settings.max_image_pixels)
    image = working_copy(photo, work_side(model))
    crops = np.asarray(label.crops_norm[: data.max_targets], np.float64)
    if label.scores is None:
        weights = np.ones(len(crops))
    else:
        scores = np.asarray(label.scores[: data.max_targets], np.float64)
        weights = np.clip(scores / max(scores.max(), 1e-9), 0.05, 1.0)
    neighbors = None
    if relations is not None and read_tokens is not None:
        neighbors = neighbors_of(relations, name, read_tokens, model.k)
    return TrainPhoto(name, image, crops, weights, neighbors, None if text is None else text[name])


def _token_reader(settings: Settings, relations: dict) -> TokenReader:
    """Token reads for the relations' collection, shared by the loading threads (shards cached)."""
    from services.retriever.token_store import TokenStore
    from shared.storage import build_object_store

    return TokenStore(build_object_store(settings), relations["collection"]).read_many


def _text_features(path: str | None) -> dict[str, np.ndarray]:
    if path is None:
        raise ProCropError("the model reads text: set data.text_features (BLIP tokens per photo)")
    from safetensors.numpy import load_file

    return load_file(path)
