"""CAD dataset runs: POST /v1/datasets starts one; GET follows its counts, DELETE cancels it, and
GET .../manifest lists every item (photo, variant) with its status.

A run is a job of kind `dataset` (same API keys and isolation as crop jobs: another key's run is
a 404). Its id is drawn at random, or derived from the caller's key and `run` when the request
names one: posting the same named run again resumes it (items already made are not made again,
items a dead broker may have lost are sent again) and answers with the same id. Its files go
under `datasets/{job_id}/` in the bucket (see services/outpainter/run.py for the layout).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import Clients, ClientsDep, Owner
from services.gateway.jobs import owned_job, send
from services.gateway.metrics import JOBS
from services.gateway.routes.crops import ERRORS
from services.gateway.schemas import JobAccepted, JobStatus
from shared.errors import ProCropError
from shared.jobs import Job, JobNotFoundError
from shared.ownership import index_source
from shared.queue import CAD_PLAN
from shared.runs import RunState
from shared.storage import parse_s3_uri

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
RUN_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class DatasetRequest(BaseModel):
    """A CAD generation run (JSON body of POST /v1/datasets)."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description="Prefix of professional photos in the gateway's bucket (e.g. 'pro/photos/'), "
        "or s3://BUCKET/PREFIX where the workers may read it.",
    )
    variants: int = Field(default=3, ge=1, le=1000, description="Canvases per photo.")
    seed: int = Field(default=0, ge=0, lt=2**63, description="The run's seed: same seed, same run.")
    limit: int | None = Field(default=None, ge=1, description="Use the first N photos by name.")
    profile: Literal["lite", "paper"] = Field(
        default="lite", description="lite: OpenCV out-painting; paper: SD-1.5 + ControlNet."
    )
    run: str | None = Field(
        default=None,
        pattern=RUN_PATTERN,
        description="Name the run to resume it later by posting it again.",
    )


class DatasetCounts(BaseModel):
    planned: int = Field(description="Items (photo, variant) planned so far.")
    in_flight: int
    finished: int
    accepted: int
    rejected: int
    failed: int
    duplicate: int = Field(description="Items whose photo is byte-identical to another's.")
    cancelled: int
    rejected_by_reason: dict[str, int]
    source_listed: bool = Field(description="Whether every photo of the source is planned.")


class DatasetStatus(BaseModel):
    job_id: str
    status: JobStatus
    params: dict[str, Any]
    counts: DatasetCounts
    error: str | None = None
    report: dict[str, Any] | None = Field(
        default=None, description="Once it is over: the report (report.json)."
    )
    prefix: str = Field(description="Where its files are, in the gateway's bucket.")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={
        **ERRORS,
        409: {
            "model": ERRORS[422]["model"],
            "description": "A run of this name exists with other parameters.",
        },
    },
    summary="Start (or resume) a CAD dataset run",
)
async def create(body: DatasetRequest, clients: ClientsDep, owner: Owner) -> JSONResponse:
    """Plan and run `variants` items per photo of `source`; follow it at GET /v1/datasets/{id}."""
    limits = clients.settings.cad
    if body.variants > limits.max_variants:
        raise HTTPException(422, f"variants: at most {limits.max_variants}, got {body.variants}")
    if body.limit is not None and body.limit * body.variants > limits.max_items:
        raise HTTPException(422, f"a run may have at most {limits.max_items:,} items")
    try:
        source = _resolve_source(clients, body.source)
    except ProCropError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    job = await run_in_threadpool(_enqueue, clients, owner, body, source)
    accepted = JobAccepted(job_id=job.id, status=job.status)
    headers = {"Location": f"/v1/datasets/{job.id}"}
    return JSONResponse(accepted.model_dump(), status.HTTP_202_ACCEPTED, headers=headers)


def _resolve_source(clients: Clients, source: str) -> str:
    """`source` as s3://bucket/prefix/, checked: readable by this gateway's tenants, non-empty."""
    storage = clients.settings.storage
    source = index_source(
        source, storage.bucket, storage.index_buckets
    )  # the same rules as indexing
    bucket, prefix = parse_s3_uri(source)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    if bucket == clients.settings.storage.bucket:
        store = clients.store
    else:
        from shared.storage import build_object_store

        store = build_object_store(clients.settings, bucket=bucket, create_bucket=False)
    if not store.list_page(prefix, "", 1):
        raise ProCropError(f"source: nothing under {source!r}")
    return f"s3://{bucket}/{prefix}"


def _enqueue(clients: Clients, owner: str, body: DatasetRequest, source: str) -> Job:
    params = {"source": source, "variants": body.variants, "seed": body.seed,
              "limit": body.limit, "profile": body.profile}  # fmt: skip
    job_id = hashlib.sha256(f"{owner}:{body.run}".encode()).hexdigest()[:32] if body.run else ""
    if job_id:
        try:
            existing: Job | None = clients.jobs.get(job_id)
        except JobNotFoundError:
            existing = None
        if existing is not None:
            if existing.params != {**params, "run": body.run}:
                raise HTTPException(
                    status.HTTP_409_CONFLICT,
                    f"run {body.run!r} exists with other parameters; resume it with the same "
                    "ones or name a new run",
                )
            send(clients, existing, clients.celery.signature(CAD_PLAN, args=(job_id, True)))
            return existing
        params["run"] = body.run
    job = clients.jobs.create("dataset", owner, params, job_id=job_id)
    send(clients, job, clients.celery.signature(CAD_PLAN, args=(job.id,)))
    JOBS.labels("dataset").inc()
    return job


@router.get(
    "/{job_id}",
    response_model=DatasetStatus,
    responses=ERRORS,
    summary="A dataset run's status and counts",
)
async def get(job_id: str, clients: ClientsDep, owner: Owner) -> DatasetStatus:
    job = await owned_job(clients, job_id, owner, "dataset")
    counts = await run_in_threadpool(_counts, clients, job.id)
    report = None
    if job.result_key:
        report = json.loads(await run_in_threadpool(clients.store.get, job.result_key))
    return DatasetStatus(
        job_id=job.id, status=job.status, params=job.params, counts=DatasetCounts(**counts),
        error=job.error, report=report, prefix=f"datasets/{job.id}/",
    )  # fmt: skip


def _counts(clients: Clients, job_id: str) -> dict[str, Any]:
    return RunState(clients.jobs.redis, job_id).read_counts().to_dict()


@router.delete(
    "/{job_id}",
    response_model=DatasetStatus,
    responses=ERRORS,
    summary="Cancel a dataset run",
)
async def cancel(job_id: str, clients: ClientsDep, owner: Owner) -> DatasetStatus:
    """No new item starts; items already running finish. The manifest is written once the last
    running item is done, and says which items finished."""
    job = await owned_job(clients, job_id, owner, "dataset")
    if await run_in_threadpool(clients.jobs.cancel, job.id):
        signature = clients.celery.signature(CAD_PLAN, args=(job.id,))
        await run_in_threadpool(signature.apply_async)
    return await get(job_id, clients, owner)


@router.get(
    "/{job_id}/manifest",
    responses={**ERRORS, 200: {"content": {"application/x-ndjson": {}}}},
    summary="Every item of a dataset run",
)
async def manifest(job_id: str, clients: ClientsDep, owner: Owner) -> StreamingResponse:
    """JSON lines, one per planned item: slot, photo, variant, item, status, reasons. Items still
    queued say so; the list grows while the planner plans."""
    job = await owned_job(clients, job_id, owner, "dataset")
    state = RunState(clients.jobs.redis, job.id)

    def lines() -> Iterator[bytes]:
        for line in state.manifest():
            yield (json.dumps(line, sort_keys=True) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")
