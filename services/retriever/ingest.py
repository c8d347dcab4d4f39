"""Index a collection of professional photos: tokens to the object store, vectors to Milvus.

Idempotent and resumable: a photo is identified by the sha256 of its bytes; photos already in the
collection are skipped, and each batch writes its token shard *before* its rows, so a row never
points at a missing shard and an interrupted run, run again, ends with exactly the full set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from services.embedder.base import CompositionEncoder
from services.retriever.sources import PhotoRef
from services.retriever.token_store import TokenStore
from shared.annotations import AnnotatedPhoto
from shared.errors import InvalidImageError, ObjectNotFoundError
from shared.images import content_hash, decode_image
from shared.storage.base import ObjectStore
from shared.vector_index import IndexedPhoto, VectorIndex

log = logging.getLogger(__name__)
DECODE_THREADS = 4  # PIL decodes without the GIL: threads overlap reading, decoding and encoding


@dataclass
class IngestReport:
    """What an indexing run did; `failed` holds (photo URI, reason) of photos that were skipped."""

    collection: str
    total: int = 0
    added: int = 0
    already_present: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def photos_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class _Decoded:
    ref: PhotoRef
    sha256: str
    image: Image.Image


class Ingestor:
    """Adds photos to one collection with one encoder."""

    def __init__(
        self,
        collection: str,
        encoder: CompositionEncoder,
        index: VectorIndex,
        store: ObjectStore,
        annotations: dict[str, AnnotatedPhoto] | None = None,
        max_pixels: int = 50_000_000,
        threads: int = DECODE_THREADS,
    ) -> None:
        self.collection, self.encoder, self.index = collection, encoder, index
        self.threads = threads
        self.tokens = TokenStore(store, collection)
        self.annotations = annotations or {}
        self.max_pixels = max_pixels
        self._exists = index.has_collection(collection)
        if self._exists:  # fail before any work if the collection was built by another encoder
            index.check_compatible(collection, encoder.spec)

    def run(
        self,
        photos: list[PhotoRef],
        batch_size: int = 64,
        on_progress: Callable[[int], None] | None = None,
    ) -> IngestReport:
        """Index `photos` in batches; `on_progress(n)` is called after each n photos handled."""
        report = IngestReport(self.collection, total=len(photos))
        started, seen = time.perf_counter(), set[str]()
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, len(photos), batch_size):
                batch = photos[start : start + batch_size]
                decoded = self._read_batch(pool, batch, report, seen)
                self._add(decoded)
                report.added += len(decoded)
                if on_progress:
                    on_progress(len(batch))
        if self._exists:
            self.index.flush(self.collection)
        report.seconds = time.perf_counter() - started
        return report

    def _read_batch(
        self, pool: ThreadPoolExecutor, batch: list[PhotoRef], report: IngestReport, seen: set[str]
    ) -> list[_Decoded]:
        """Read and hash a batch, drop known photos, decode the rest; failures go to `report`."""
        raw = list(pool.map(_read, batch))
        fresh = []
        for ref, data in raw:
            if isinstance(data, str):
                report.failed.append((ref.uri, data))
                continue
            sha = content_hash(data)
            if sha in seen:
                report.duplicates += 1
                continue
            seen.add(sha)
            fresh.append((ref, sha, data))
        known = self._known({sha for _, sha, _ in fresh})
        report.already_present += len(known)
        todo = [item for item in fresh if item[1] not in known]
        decoded = pool.map(lambda item: self._decode(*item), todo)
        out = []
        for item in decoded:
            if isinstance(item, tuple):
                report.failed.append(item)
            else:
                out.append(item)
        return out

    def _known(self, hashes: set[str]) -> set[str]:
        return self.index.existing_hashes(self.collection, hashes) if self._exists else set()

    def _decode(self, ref: PhotoRef, sha: str, data: bytes) -> _Decoded | tuple[str, str]:
        try:
            return _Decoded(ref, sha, decode_image(data, ref.uri, self.max_pixels))
        except InvalidImageError as exc:
            return ref.uri, str(exc)

    def _add(self, decoded: list[_Decoded]) -> None:
        """Encode a batch, write its token shard, then its rows (in that order)."""
        if not decoded:
            return
        embedding = self.encoder.encode([d.image for d in decoded])
        if not self._exists:  # created lazily: a run where every photo fails leaves nothing
            self.index.ensure_collection(self.collection, self.encoder.spec)
            self._exists = True
        hashes = [d.sha256 for d in decoded]
        shard_key = self.tokens.write_shard(hashes, embedding.tokens)
        rows = [
            IndexedPhoto(
                content_hash=d.sha256,
                vector=embedding.vectors[i],
                source=d.ref.uri,
                tokens_key=shard_key,
                token_row=i,
                width=d.image.width,
                height=d.image.height,
                crops_norm=self._crops(d.ref.name),
            )
            for i, d in enumerate(decoded)
        ]
        self.index.upsert(self.collection, rows)

    def _crops(self, name: str) -> list[list[float]]:
        photo = self.annotations.get(name) or self.annotations.get(name.rsplit("/", 1)[-1])
        return [list(box) for box in photo.crops_norm] if photo else []


def _read(ref: PhotoRef) -> tuple[PhotoRef, bytes | str]:
    """(ref, bytes), or (ref, reason) when the photo cannot be read."""
    try:
        data = ref.read()
    except (InvalidImageError, ObjectNotFoundError) as exc:  # one bad photo must not stop a run
        return ref, str(exc)
    if not data:
        return ref, f"{ref.uri}: empty file (0 bytes)"
    return ref, data
