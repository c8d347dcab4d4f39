"""The composition index over pymilvus: Milvus Lite in a file by default, any Milvus URI otherwise.

Collection schema (one row per photo):

    id            INT64, primary   first 60 bits of the photo's sha256 (re-ingest = same id)
    vector        FLOAT_VECTOR     the encoder's index vector (unit norm, inner-product metric)
    content_hash  VARCHAR(64)      sha256 of the photo bytes
    source        VARCHAR(1024)    where the photo came from (path or s3:// URI)
    tokens_key    VARCHAR(512)     object key of the token shard holding this photo's tokens
    token_row     INT32            row of this photo in that shard
    width, height INT32            photo size in pixels (upright)
    crops_norm    JSON             annotated crops, normalized xyxy in [0, 1]: [[x1, y1, x2, y2], ...]

The collection property `procrop.meta` holds JSON metadata: the encoder's name, version, token and vector
dims, so a collection is never searched with another encoder's vectors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from shared.errors import (
    CollectionNotFoundError,
    IncompatibleCollectionError,
    VectorIndexError,
)
from shared.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
SCHEMA_VERSION = 1
_META_PROPERTY = "procrop.meta"
_OUTPUT_FIELDS = ["content_hash", "source", "tokens_key", "token_row", "width", "height"]


@dataclass(frozen=True)
class IndexConfig:
    """How vectors are indexed and searched (chosen by benchmarks/bench_retrieval.py)."""

    index_type: str = "FLAT"
    build_params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)
    metric: str = "IP"  # vectors are unit-norm: inner product == cosine


INDEX_PRESETS = {
    "FLAT": IndexConfig(),
    "HNSW": IndexConfig("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64}),
    "IVF_FLAT": IndexConfig("IVF_FLAT", {"nlist": 1024}, {"nprobe": 64}),
}


@dataclass(frozen=True)
class IndexedPhoto:
    """One row of a collection; `crops_norm` are normalized xyxy boxes."""

    content_hash: str
    vector: np.ndarray
    source: str
    tokens_key: str
    token_row: int
    width: int
    height: int
    crops_norm: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class Neighbor:
    """A search hit: the photo's row and its similarity `score` (inner product, higher is closer)."""

    id: int
    score: float
    content_hash: str
    source: str
    tokens_key: str
    token_row: int
    width: int
    height: int
    crops_norm: list[list[float]]


def photo_id(content_hash: str) -> int:
    """Deterministic primary key of a photo: the first 60 bits of its sha256."""
    return int(content_hash[:15], 16)


class VectorIndex:
    """Collections of composition vectors and photo metadata in Milvus."""

    def __init__(
        self, uri: str, token: str = "", timeout_s: float = 30.0, config: IndexConfig | None = None
    ) -> None:
        self.uri, self.timeout_s = uri, timeout_s
        self.config = config or IndexConfig()
        self._client = self._connect(uri, token)
        self._loaded: set[str] = set()

    def _connect(self, uri: str, token: str) -> Any:
        from pymilvus import MilvusClient  # heavy import, only when an index is opened

        # pymilvus and Milvus Lite's gRPC shim log every failed call with a traceback; our errors
        # already say what failed and where, once.
        for noisy in ("pymilvus", "grpc._server"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)

        if not uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")):
            Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=uri, token=token, timeout=self.timeout_s)
        except Exception as exc:  # pymilvus raises several unrelated types on connect
            raise VectorIndexError(f"cannot open Milvus at {uri}: {_reason(exc)}") from None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if isinstance(exc, VectorIndexError):
                raise
            raise VectorIndexError(f"Milvus at {self.uri}: {what} failed: {_reason(exc)}") from None

    # Collections ---------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        return sorted(self._call("listing collections", self._client.list_collections))

    def has_collection(self, name: str) -> bool:
        return bool(self._call("collection lookup", lambda: self._client.has_collection(name)))

    def _ready(self, name: str) -> str:
        """`name`, loaded for search/query (collections are 'released' in a new process)."""
        if name not in self._loaded:
            state = self._call("load state", lambda: self._client.get_load_state(name))
            if "Loaded" not in str(state.get("state")):
                self._call("load", lambda: self._client.load_collection(name))
            self._loaded.add(name)
        return name

    def metadata(self, name: str) -> dict[str, Any]:
        """The collection's JSON metadata (encoder spec); raises `CollectionNotFoundError`."""
        if not self.has_collection(name):
            raise CollectionNotFoundError(
                f"no collection {name!r} in Milvus at {self.uri} "
                f"(have: {', '.join(self.list_collections()) or 'none'})"
            )
        info = self._call("describe", lambda: self._client.describe_collection(name))
        try:
            return dict(json.loads(info.get("properties", {})[_META_PROPERTY]))
        except (KeyError, json.JSONDecodeError):
            raise IncompatibleCollectionError(
                f"collection {name!r} in {self.uri} was not made by procrop"
            ) from None

    def ensure_collection(self, name: str, spec: dict[str, Any]) -> None:
        """Create `name` for the encoder described by `spec`, or check an existing one matches it."""
        if self.has_collection(name):
            self.check_compatible(name, spec)
            return
        self._call("collection creation", lambda: self._create(name, spec))
        log.info("created collection %s in %s", name, self.uri)

    def check_compatible(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Raise `IncompatibleCollectionError` unless `name` was built by the encoder in `spec`."""
        meta = self.metadata(name)
        keys = ("encoder", "encoder_version", "vector_dim", "token_dim")
        if any(meta.get(k) != spec.get(k) for k in keys):
            built = {k: meta.get(k) for k in keys}
            asked = {k: spec.get(k) for k in keys}
            raise IncompatibleCollectionError(
                f"collection {name!r} was built with {built}, not {asked}"
            )
        return meta

    def _create(self, name: str, spec: dict[str, Any]) -> None:
        from pymilvus import DataType, MilvusClient

        meta = {"schema_version": SCHEMA_VERSION, **spec}
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(spec["vector_dim"]))
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("source", DataType.VARCHAR, max_length=1024)
        schema.add_field("tokens_key", DataType.VARCHAR, max_length=512)
        schema.add_field("token_row", DataType.INT32)
        schema.add_field("width", DataType.INT32)
        schema.add_field("height", DataType.INT32)
        schema.add_field("crops_norm", DataType.JSON)
        index = self._client.prepare_index_params()
        cfg = self.config
        # Nested under "params": Milvus Lite 3.2 reads only that key and silently drops flat build
        # params (Milvus servers accept this legacy form too); describe_index shows what arrived.
        index.add_index(
            "vector",
            index_type=cfg.index_type,
            metric_type=cfg.metric,
            params={"params": dict(cfg.build_params)} if cfg.build_params else {},
        )
        self._client.create_collection(
            name, schema=schema, index_params=index, properties={_META_PROPERTY: json.dumps(meta)}
        )

    def drop_collection(self, name: str) -> None:
        self._call("drop", lambda: self._client.drop_collection(name))
        self._loaded.discard(name)

    # Rows ----------------------------------------------------------------------------------

    def count(self, name: str) -> int:
        self.metadata(name)
        rows = self._call(
            "count",
            lambda: self._client.query(self._ready(name), filter="", output_fields=["count(*)"]),
        )
        return int(rows[0]["count(*)"])

    def existing_hashes(self, name: str, hashes: Iterable[str]) -> set[str]:
        """Which of `hashes` are already in the collection (looked up by primary key)."""
        return {row["content_hash"] for row in self._get(name, hashes, ["content_hash"])}

    def vectors(self, name: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored index vectors of those `hashes` that are in the collection."""
        rows = self._get(name, hashes, ["vector", "content_hash"])
        return {row["content_hash"]: np.asarray(row["vector"], np.float32) for row in rows}

    def rows(self, name: str, hashes: Iterable[str], fields: list[str]) -> list[dict[str, Any]]:
        """The `fields` of the rows of those `hashes` that are in the collection."""
        return self._get(name, hashes, fields)

    def _get(self, name: str, hashes: Iterable[str], fields: list[str]) -> list[dict[str, Any]]:
        """Rows of the photos with these sha256s, by primary key, in chunks of 1000."""
        ids = [photo_id(h) for h in hashes]
        rows: list[dict[str, Any]] = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            rows += self._call(
                "lookup", partial(self._client.get, self._ready(name), chunk, fields)
            )
        return rows

    def upsert(self, name: str, photos: Sequence[IndexedPhoto]) -> None:
        """Insert or replace rows (keyed by content hash: upserting twice changes nothing)."""
        if not photos:
            return
        rows = [_row(p) for p in photos]
        self._call("upsert", lambda: self._client.upsert(name, rows))

    def flush(self, name: str) -> None:
        """Seal what was written so it is durable and served from the built index."""
        self._call("flush", lambda: self._client.flush(name))

    def search(self, name: str, vectors: np.ndarray, k: int) -> list[list[Neighbor]]:
        """Top-`k` neighbours of each (Q, D) query vector, best first."""
        if len(vectors) == 0:
            return []
        params = {"metric_type": self.config.metric, "params": self._search_params(k)}
        hits = self._call(
            "search",
            lambda: self._client.search(
                self._ready(name),
                data=np.asarray(vectors, np.float32).tolist(),
                limit=k,
                output_fields=[*_OUTPUT_FIELDS, "crops_norm"],
                search_params=params,
            ),
        )
        return [[_neighbor(hit) for hit in row] for row in hits]

    def _search_params(self, k: int) -> dict[str, int]:
        params = dict(self.config.search_params)
        if "ef" in params:
            params["ef"] = max(params["ef"], k)  # HNSW needs ef >= k
        return params

    def close(self) -> None:
        self._client.close()


def _row(photo: IndexedPhoto) -> dict[str, Any]:
    return {
        "id": photo_id(photo.content_hash),
        "vector": np.asarray(photo.vector, np.float32).tolist(),
        "content_hash": photo.content_hash,
        "source": photo.source[:1024],
        "tokens_key": photo.tokens_key,
        "token_row": int(photo.token_row),
        "width": int(photo.width),
        "height": int(photo.height),
        "crops_norm": [[round(float(v), 6) for v in box] for box in photo.crops_norm],
    }


def _neighbor(hit: dict[str, Any]) -> Neighbor:
    entity = hit.get("entity", hit)
    return Neighbor(
        id=int(hit["id"]),
        score=float(hit["distance"]),
        crops_norm=list(entity.get("crops_norm") or []),
        **{k: entity[k] for k in _OUTPUT_FIELDS},
    )


def _reason(exc: Exception) -> str:
    """The first line of a pymilvus error, without its boilerplate."""
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_index(settings: Settings, config: IndexConfig | None = None) -> VectorIndex:
    """The configured index: `PROCROP_MILVUS__URI`, or Milvus Lite at `$PROCROP_HOME/milvus.db`."""
    cfg = settings.milvus
    return VectorIndex(
        settings.milvus_uri,
        cfg.token.get_secret_value(),
        timeout_s=cfg.timeout_s,
        config=config or INDEX_PRESETS[cfg.index_type],
    )
