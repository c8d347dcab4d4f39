"""Composition search at 100,000 stored vectors: Milvus Lite index types against exact numpy
brute force, in one run, through the same `VectorIndex` the CLI uses (output fields included).

Vectors are realistic: lite descriptors of FCDB photos (train split), recombined in pairs with a
little noise to reach 100K; queries are the held-out validation photos. Recall@10 is measured
against exact inner-product search on the same vectors.

    .venv/bin/python -m benchmarks.bench_retrieval [--n 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import FCDB, emit, summary
from services.embedder.base import l2_normalize
from services.embedder.lite import LiteCompositionEncoder
from shared.annotations import fixed_split
from shared.images import load_image
from shared.vector_index import IndexConfig, IndexedPhoto, VectorIndex

CONFIGS = {  # the defaults of PROCROP_MILVUS__INDEX_TYPE are INDEX_PRESETS in shared/vector_index.py
    "FLAT": IndexConfig("FLAT", {}, {}),
    "HNSW_M16_ef64": IndexConfig("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64}),
    "IVF_FLAT_1024_p32": IndexConfig("IVF_FLAT", {"nlist": 1024}, {"nprobe": 32}),
    "IVF_FLAT_1024_p64": IndexConfig("IVF_FLAT", {"nlist": 1024}, {"nprobe": 64}),
    "IVF_FLAT_256_p32": IndexConfig("IVF_FLAT", {"nlist": 256}, {"nprobe": 32}),
}
SPEC = {"encoder": "lite", "encoder_version": "bench", "token_dim": 16, "vector_dim": 256}


def real_vectors(max_photos: int) -> tuple[np.ndarray, np.ndarray]:
    """Lite vectors of FCDB train photos (base) and validation photos (queries)."""
    names = sorted(p.name for p in FCDB.glob("*.jpg"))[:max_photos]
    train, val = fixed_split(names, n_val=min(200, len(names) // 5))
    encoder = LiteCompositionEncoder()

    def encode(subset: list[str]) -> np.ndarray:
        return np.concatenate([encoder.encode([load_image(FCDB / n)]).vectors for n in subset])

    return encode(train), encode(val)


def grow(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors from pairs of real ones: a * u + (1 - a) * v + noise, renormalized."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(base), (2, n))
    a = rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
    mixed = a * base[i] + (1 - a) * base[j]
    mixed += rng.normal(0, 0.02, mixed.shape).astype(np.float32)
    return l2_normalize(mixed).astype(np.float32)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by numpy, and per-query wall times in ms."""
    tops, times = [], []
    for q in queries:
        start = time.perf_counter()
        scores = vectors @ q
        top = np.argpartition(-scores, k)[:k]
        tops.append(top[np.argsort(-scores[top])])
        times.append((time.perf_counter() - start) * 1000)
    return np.stack(tops), np.asarray(times)


def bench_milvus(name: str, cfg: IndexConfig, vectors: np.ndarray, queries: np.ndarray,
                 truth: np.ndarray, k: int, settle_s: float) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        index = VectorIndex(str(Path(home) / "milvus.db"), config=cfg)
        index.ensure_collection("bench", SPEC)
        start = time.perf_counter()
        for lo in range(0, len(vectors), 5000):
            index.upsert(
                "bench", [_photo(i, vectors[i]) for i in range(lo, min(lo + 5000, len(vectors)))]
            )
        index.flush("bench")  # seals segments; Milvus Lite builds the index here
        build_s = time.perf_counter() - start
        index.search("bench", queries[:5], k)  # warm-up (loads the collection)
        right_after = _measure(index, queries, truth, k)
        # Milvus Lite builds HNSW in the background after the flush (~1 min per 100K on 2 cores);
        # until then it scans. Measure again once the build has had time to finish.
        time.sleep(settle_s)
        steady = _measure(index, queries, truth, k)
        index.close()
    return {"config": name, "index_type": cfg.index_type, "build_params": cfg.build_params,
            "search_params": cfg.search_params, "insert_and_flush_s": round(build_s, 1),
            "right_after_flush": right_after, f"after_{settle_s:.0f}s": steady}  # fmt: skip


def _measure(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> dict:
    times, hits = [], []
    for q in queries:
        t0 = time.perf_counter()
        row = index.search("bench", q[None], k)[0]
        times.append((time.perf_counter() - t0) * 1000)
        hits.append([int(h.source) for h in row])
    recall = np.mean([len(set(h) & set(t)) / k for h, t in zip(hits, truth, strict=True)])
    return {"recall_at_10": round(float(recall), 4), **summary(np.asarray(times))}


def _photo(i: int, vector: np.ndarray) -> IndexedPhoto:
    sha = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
    return IndexedPhoto(sha, vector, str(i), "collections/bench/tokens/x.safetensors", i, 640, 480)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--photos", type=int, default=1369, help="FCDB photos to derive from")
    parser.add_argument(
        "--configs",
        default="FLAT,HNSW_M16_ef64,IVF_FLAT_1024_p32,IVF_FLAT_1024_p64,IVF_FLAT_256_p32",
    )
    parser.add_argument("--settle-s", type=float, default=75.0, help="wait before re-measuring")
    args = parser.parse_args()
    base, queries = real_vectors(args.photos)
    vectors, queries = grow(base, args.n), queries[: args.queries]
    k = 10
    truth, numpy_ms = exact_top(vectors, queries, k)
    results = [
        bench_milvus(c, CONFIGS[c], vectors, queries, truth, k, args.settle_s)
        for c in args.configs.split(",")
    ]
    emit("retrieval_100k", {"n_vectors": len(vectors), "dim": vectors.shape[1], "queries": len(queries),
                            "k": k, "numpy_exact": summary(numpy_ms), "milvus_lite": results})  # fmt: skip


if __name__ == "__main__":
    main()
