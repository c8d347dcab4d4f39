"""The retriever's workers: composition retrieval (queue `retrieve`) and indexing (queue `index`).

    procrop worker retrieve     # chain stage 2 of a crop job
    procrop worker index        # ingest jobs: POST /v1/collections/{name}/index

Retrieve: the query's index vector (from its features) -> its top-K compositions in Milvus, with
their tokens (object store) and crops, written to `jobs/{job}/neighbors.safetensors`: tokens
(K, 64, T) f32, crops (K, 4) normalized xyxy, has_crop (K,). The collection is
PROCROP_CROP__COLLECTION, or else the crop model's own bundled index, installed into Milvus once.

Index: every task first re-checks the job against its owner (`shared/ownership.py`: a tenant
writes only its own `t{owner}_{name}` collections, never the crop model's, from sources it may
read). A plan task lists the source once (`jobs/{job}/plan.json`) and fans out one task per batch
of `PROCROP_QUEUE__INDEX_BATCH` photos; ingestion skips photos already in the collection, so a
redelivered batch adds nothing twice. Each batch reports to `jobs/{job}/parts/{i}.json`; the
batch that completes the job merges them into `jobs/{job}/report.json`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import asdict
from typing import Any

from celery import Task, group

from services.retriever.neighbors import MilvusRetrieval
from services.retriever.search import Retriever
from services.retriever.token_store import TokenStore
from shared.checkpoints import ModelCard, model_location, read_model_card
from shared.errors import ProCropError
from shared.ownership import OwnershipError, check_index_params
from shared.queue import INDEX_BATCH, INDEX_PLAN, RETRIEVE, worker_app
from shared.settings import get_settings
from shared.storage.keys import job_key
from shared.vector_index import VectorIndex, open_index
from shared.worker import (
    chain_stage,
    get_arrays,
    jobs,
    load_after_fork,
    object_store,
    put_arrays,
    run_stage,
    run_worker,
)

app = worker_app()


@functools.cache
def vector_index() -> VectorIndex:
    return open_index(get_settings())


@functools.cache
def crop_model() -> tuple[ModelCard, str]:
    """What the crop model asks for (K neighbours, or none) and the collection they come from."""
    settings = get_settings()
    location = model_location(settings, settings.profile)
    config = read_model_card(location, settings)
    collection = settings.crop.collection
    if collection is None and config.use_retrieval:
        from services.retriever.bundle_index import install_bundle

        if "://" in location:
            raise ProCropError(f"{location}: set PROCROP_CROP__COLLECTION for a model in S3")
        collection = install_bundle(location, vector_index(), object_store())
    return config, collection or ""


@functools.lru_cache(maxsize=8)
def retrieval(spec_json: str) -> MilvusRetrieval:
    """Retrieval for vectors of the encoder `spec_json` (checked against the collection once)."""
    config, collection = crop_model()
    retriever = Retriever(collection, None, vector_index(), spec=json.loads(spec_json))
    return MilvusRetrieval(
        retriever, TokenStore(object_store(), collection), config.k, config.transfer_k
    )


def find_neighbors(job_id: str, features_key: str, sha256: str) -> str | None:
    """Write the job's neighbours; returns their key (None when the model retrieves nothing)."""
    config, _ = crop_model()
    if not config.use_retrieval:
        return None
    arrays, meta = get_arrays(features_key)
    [found] = retrieval(meta["encoder"]).neighbors(arrays["vector"][None], [sha256])
    key = job_key(job_id, "neighbors.safetensors")
    arrays = {"tokens": found.tokens, "crops": found.crops, "has_crop": found.has_crop}
    if found.wide is not None:  # the crops of the model's `transfer_k` nearest
        arrays["wide"] = found.wide
    put_arrays(key, arrays, {})
    return key


@app.task(name=RETRIEVE, bind=True)
def retrieve(task: Task, message: dict[str, Any]) -> dict[str, Any]:
    """Chain stage 2: adds neighbors_key to `message`."""
    job_id, features_key, sha = message["job_id"], message["features_key"], message["sha256"]
    return chain_stage(
        task,
        message,
        "retrieve",
        "neighbors_key",
        lambda: find_neighbors(job_id, features_key, sha),
    )


# --- indexing jobs -------------------------------------------------------------------------------


def plan_index(job_id: str) -> int:
    """List the job's source once, record the plan, fan out one task per batch; returns batches."""
    from services.retriever.sources import list_photos

    params = _index_params(job_id)
    names = [ref.name for ref in list_photos(params["source"], get_settings())]
    if not names:
        raise ValueError(f"{params['source']}: no JPEG, PNG or WebP photos found")
    size = get_settings().queue.index_batch
    batches = [names[i : i + size] for i in range(0, len(names), size)]
    object_store().put(job_key(job_id, "plan.json"), json.dumps({"batches": batches}).encode())
    jobs().set_progress(job_id, len(names))
    group(app.signature(INDEX_BATCH, args=(job_id, i)) for i in range(len(batches))).apply_async()
    return len(batches)


def index_batch_photos(job_id: str, batch: int) -> None:
    """Ingest batch `batch` of the job's plan; the batch that completes the job reports it."""
    from services.embedder.registry import build_encoder
    from services.retriever.ingest import Ingestor
    from services.retriever.sources import photo_refs

    settings, store = get_settings(), object_store()
    params = _index_params(job_id)
    names = json.loads(store.get(job_key(job_id, "plan.json")))["batches"][batch]
    encoder = build_encoder(settings.embedder, params.get("encoder"))
    ingestor = Ingestor(
        params["collection"], encoder, vector_index(), store, _annotations(params),
        settings.max_image_pixels,
    )  # fmt: skip
    report = ingestor.run(photo_refs(params["source"], names, settings), batch_size=64)
    store.put(job_key(job_id, f"parts/{batch:06d}.json"), json.dumps(asdict(report)).encode())
    done, total = jobs().mark_part_done(job_id, str(batch), len(names))
    if done >= total:
        vector_index().flush(params["collection"])
        jobs().succeed(job_id, _merge_reports(job_id))


def _index_params(job_id: str) -> dict[str, Any]:
    """The job's parameters, re-checked as the gateway checked them (a task may have been put on
    the queue by hand): the owner's own collection, never the crop model's, and a source and
    annotations it may read (shared/ownership.py). OwnershipError fails the job."""
    job, settings = jobs().get(job_id), get_settings()
    check_index_params(job.owner, job.params, settings.storage.bucket,
                       settings.storage.index_bucket_set)  # fmt: skip
    if job.params["collection"] == settings.crop.collection:
        raise OwnershipError(f"collection {job.params['collection']!r} is the crop model's index")
    return job.params


def _annotations(params: dict[str, Any]) -> Any:
    """Crop annotations (FCDB format) stored at the job's `annotations_key`, if it has one."""
    key = params.get("annotations_key")
    if not key:
        return None
    from shared.annotations import load_fcdb

    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        handle.write(object_store().get(key))
        handle.flush()
        return load_fcdb(handle.name)


def _merge_reports(job_id: str) -> str:
    """Sum the batch reports into `jobs/{job}/report.json`; returns its key."""
    store = object_store()
    merged: dict[str, Any] = {"added": 0, "already_present": 0, "duplicates": 0, "failed": []}
    for key in store.list(job_key(job_id, "parts/")):
        part = json.loads(store.get(key))
        merged["collection"] = part["collection"]
        for name in ("added", "already_present", "duplicates"):
            merged[name] += part[name]
        merged["failed"] += part["failed"]
    key = job_key(job_id, "report.json")
    store.put(key, json.dumps(merged).encode(), "application/json")
    return key


@app.task(name=INDEX_PLAN, bind=True)
def index_plan(task: Task, job_id: str) -> None:
    run_stage(task, job_id, "plan", lambda: plan_index(job_id))


@app.task(name=INDEX_BATCH, bind=True)
def index_batch(task: Task, job_id: str, batch: int) -> None:
    run_stage(task, job_id, "index", lambda: index_batch_photos(job_id, batch))


def _load() -> None:
    """Open Milvus and install the crop model's index when this process serves retrieval."""
    crop_model()


def main(queue: str = "retrieve") -> None:
    if queue == "retrieve":  # only retrieval needs the crop model's index at hand
        load_after_fork(_load)
    else:
        import services.outpainter.worker  # noqa: F401  (CAD runs' planner is an index task)
    run_worker(queue)


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else "retrieve")
