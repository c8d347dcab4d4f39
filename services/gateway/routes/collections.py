"""Composition collections: POST /v1/collections/{name}/index starts an indexing job.

A collection of the API belongs to the tenant (API key) that indexes into it: `name` is stored as
`t{owner}_{name}`, so no tenant reaches another's collections or the crop model's own index, and
the source must be one the tenant may read. The rules, and the index worker's re-check of them,
are in `shared/ownership.py`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import Clients, ClientsDep, Owner
from services.gateway.jobs import send
from services.gateway.metrics import JOBS
from services.gateway.routes.crops import ERRORS
from services.gateway.schemas import IndexRequest, JobAccepted
from shared.jobs import Job
from shared.ownership import (
    NAME_PATTERN,
    OwnershipError,
    check_annotations_key,
    index_source,
    tenant_collection,
)
from shared.queue import INDEX_PLAN

router = APIRouter(prefix="/v1/collections", tags=["collections"])


@router.post(
    "/{name}/index",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses=ERRORS,
    summary="Index photos into a collection",
)
async def index(
    name: Annotated[str, PathParam(pattern=NAME_PATTERN, max_length=200)],
    body: IndexRequest,
    clients: ClientsDep,
    owner: Owner,
) -> JSONResponse:
    """Ingest every photo under `source` into your collection `name` (created if missing; photos
    it already holds are skipped). Collections are per API key: another key's `name` is another
    collection. `source` is a prefix of the gateway's bucket outside its own areas (`uploads/`,
    `jobs/`, `features/`, `datasets/`, `collections/`, `checkpoints/`), or `s3://bucket/prefix` of
    a bucket in PROCROP_STORAGE__INDEX_BUCKETS. Follow the job at GET /v1/jobs/{job_id}."""
    storage = clients.settings.storage
    try:
        params = {
            "collection": tenant_collection(owner, name), "name": name,
            "source": index_source(body.source, storage.bucket, storage.index_bucket_set),
            "encoder": body.encoder,
            "annotations_key": _annotations(body.annotations_key),
        }  # fmt: skip
    except OwnershipError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    job = await run_in_threadpool(_enqueue, clients, owner, params)
    accepted = JobAccepted(job_id=job.id, status=job.status)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    return JSONResponse(accepted.model_dump(), status.HTTP_202_ACCEPTED, headers=headers)


def _annotations(key: str | None) -> str | None:
    return check_annotations_key(key) if key else None


def _enqueue(clients: Clients, owner: str, params: dict[str, Any]) -> Job:
    job = clients.jobs.create("index", owner, params)
    send(clients, job, clients.celery.signature(INDEX_PLAN, args=(job.id,)))
    JOBS.labels("index").inc()
    return job
