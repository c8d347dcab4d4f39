"""Ingest throughput (photos/s) of `procrop index` on FCDB train, lite encoder, embedded mode:
our pipeline (threaded reading + decoding overlapping encoding, one token shard per batch) against
the obvious alternative in the same run (one photo at a time, sequential).

    .venv/bin/python -m benchmarks.bench_ingest [--photos 1369]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import FCDB, emit
from services.embedder.lite import LiteCompositionEncoder
from services.retriever.ingest import Ingestor
from services.retriever.sources import list_photos
from shared.settings import load_settings
from shared.storage import LocalObjectStore
from shared.vector_index import VectorIndex


def run_once(photos: list, threads: int, batch_size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        index = VectorIndex(str(Path(home) / "milvus.db"))
        ingestor = Ingestor(
            "bench", LiteCompositionEncoder(), index, LocalObjectStore(home), threads=threads
        )
        report = ingestor.run(photos, batch_size=batch_size)
        shards = len(list(LocalObjectStore(home).list("collections/bench/tokens/")))
        index.close()
    return {
        "photos_per_s": round(report.photos_per_second, 1),
        "seconds": round(report.seconds, 2),
        "added": report.added,
        "token_objects": shards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=1369)
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    args = parser.parse_args()
    photos = list_photos(str(args.fcdb), load_settings())[: args.photos]
    ours = run_once(photos, threads=4, batch_size=64)
    sequential = run_once(photos, threads=1, batch_size=1)
    emit(
        "ingest_fcdb_train",
        {
            "photos": len(photos),
            "ours_threaded_batched": ours,
            "sequential_one_by_one": sequential,
            "speedup": round(ours["photos_per_s"] / sequential["photos_per_s"], 2),
        },
    )


if __name__ == "__main__":
    main()
