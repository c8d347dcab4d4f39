"""Composition collections: POST /v1/collections/{name}/index starts an indexing job."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import Clients, ClientsDep, Owner
from services.gateway.jobs import send
from services.gateway.metrics import JOBS
from services.gateway.routes.crops import ERRORS
from services.gateway.schemas import IndexRequest, JobAccepted
from shared.errors import ProCropError
from shared.jobs import Job
from shared.queue import INDEX_PLAN
from shared.storage import check_key
from shared.storage.keys import check_collection_name

router = APIRouter(prefix="/v1/collections", tags=["collections"])


@router.post(
    "/{name}/index",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses=ERRORS,
    summary="Index photos into a collection",
)
async def index(name: str, body: IndexRequest, clients: ClientsDep, owner: Owner) -> JSONResponse:
    """Ingest every photo under `source` into collection `name` (created if missing; photos it
    already holds are skipped). Follow the job, with its progress, at GET /v1/jobs/{job_id}."""
    try:
        check_collection_name(name)
        _check_source(body.source)
        if body.annotations_key:
            check_key(body.annotations_key)
    except ProCropError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    job = await run_in_threadpool(_enqueue, clients, owner, name, body)
    accepted = JobAccepted(job_id=job.id, status=job.status)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    return JSONResponse(accepted.model_dump(), status.HTTP_202_ACCEPTED, headers=headers)


def _check_source(source: str) -> None:
    """A non-empty prefix without '..' parts; not the gateway's own uploads or job outputs."""
    prefix = source.strip().removeprefix("s3://")
    if not prefix.strip("/"):
        raise ProCropError("source: give a prefix of photos, e.g. 'pro/photos/'")
    if source.strip().startswith("s3://"):
        prefix = prefix.partition("/")[2]
    if ".." in prefix.split("/") or (
        prefix.split("/")[0] in ("uploads", "jobs", "features")
        and not source.strip().startswith("s3://")
    ):
        raise ProCropError(f"source: {source!r} is not a prefix of photos to index")


def _enqueue(clients: Clients, owner: str, name: str, body: IndexRequest) -> Job:
    source = body.source.strip()
    if not source.startswith("s3://"):  # a prefix of the gateway's own bucket
        source = f"s3://{clients.settings.storage.bucket}/{source.lstrip('/')}"
    params = {"collection": name, "source": source, "encoder": body.encoder,
              "annotations_key": body.annotations_key}  # fmt: skip
    job = clients.jobs.create("index", owner, params)
    send(clients, job, clients.celery.signature(INDEX_PLAN, args=(job.id,)))
    JOBS.labels("index").inc()
    return job
