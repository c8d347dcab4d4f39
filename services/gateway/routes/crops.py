"""Crop jobs: POST /v1/crops, GET and DELETE /v1/crops/{job_id}.

A job is the Celery chain embed -> retrieve -> crop over the photo's object key; the photo is
stored under `uploads/{sha256}.{ext}` first, so the same photo sent twice is stored once.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from services.gateway.deps import Clients, ClientsDep, Owner
from services.gateway.jobs import owned_job, result_of, send, timings, wait_for
from services.gateway.metrics import JOBS
from services.gateway.schemas import (
    RATIO_FIELD_CHARS,
    CropJob,
    CropMultipartForm,
    CropRequest,
    CropResult,
    Error,
    JobAccepted,
    first_error,
)
from services.gateway.uploads import checked_photo
from shared.crop_request import check_crop_request
from shared.errors import ObjectNotFoundError
from shared.jobs import Job
from shared.queue import crop_chain

router = APIRouter(prefix="/v1/crops", tags=["crops"])
ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: {"model": Error} for code in (400, 401, 404, 413, 415, 422)},
    503: {"model": Error, "description": "Redis, the broker, S3 or Milvus does not answer."},
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": CropMultipartForm.model_json_schema()},
            "application/json": {"schema": CropRequest.model_json_schema()},
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={200: {"model": CropJob, "description": "Finished within `wait`."}, **ERRORS},
    openapi_extra=_OPENAPI_BODY,
    summary="Submit a crop job",
)
async def submit(request: Request, clients: ClientsDep, owner: Owner) -> Any:
    """Crop a photo: multipart with the photo as `image`, or JSON naming an object key.

    Answers 202 with the job id, or, when the job finishes within `wait` seconds, 200 with the
    job and its crops (the body of GET /v1/crops/{job_id})."""
    form = await _read_request(request)
    photo = await _photo(clients, owner, form)
    job = await run_in_threadpool(_enqueue, clients, owner, form, photo)
    wait = min(form.wait, clients.settings.gateway.max_wait_s)
    if wait > 0:
        job = await wait_for(clients, job.id, wait)
        if job.finished:
            return JSONResponse((await crop_job_body(clients, job)).model_dump())
    accepted = JobAccepted(job_id=job.id, status=job.status)
    headers = {"Location": f"/v1/crops/{job.id}"}
    return JSONResponse(accepted.model_dump(), status.HTTP_202_ACCEPTED, headers=headers)


@router.get("/{job_id}", response_model=CropJob, responses=ERRORS, summary="A crop job")
async def get(job_id: str, clients: ClientsDep, owner: Owner) -> CropJob:
    """The job's status and, once it succeeded, its crops (best first)."""
    return await crop_job_body(clients, await owned_job(clients, job_id, owner, "crop"))


@router.delete(
    "/{job_id}",
    response_model=CropJob,
    responses={**ERRORS, 409: {"model": Error}},
    summary="Cancel a crop job",
)
async def cancel(job_id: str, clients: ClientsDep, owner: Owner) -> CropJob:
    """Cancel a queued or running job (its remaining stages are skipped); 409 once it ended."""
    job = await owned_job(clients, job_id, owner, "crop")
    cancelled = await run_in_threadpool(clients.jobs.cancel, job.id)
    job = await run_in_threadpool(clients.jobs.get, job.id)
    if not cancelled:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
    return await crop_job_body(clients, job)


async def crop_job_body(clients: Clients, job: Job) -> CropJob:
    result = await result_of(clients, job)
    return CropJob(
        job_id=job.id, status=job.status, error=job.error,
        result=CropResult.model_validate(result) if result else None,
        created=job.created, updated=job.updated, timings=timings(job),
    )  # fmt: skip


async def _read_request(request: Request) -> CropMultipartForm | CropRequest:
    """The request as a multipart form (with the photo's bytes) or a JSON `CropRequest`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if kind == "multipart/form-data":
            return await _read_form(request)
        if kind == "application/json":
            return CropRequest.model_validate(json.loads(await request.body()))
    except ValidationError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, first_error(exc.errors())
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"invalid JSON: {exc}") from None
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        f"send multipart/form-data (field 'image') or application/json, not {kind or 'nothing'}",
    )


async def _read_form(request: Request) -> CropMultipartForm:
    async with request.form(max_files=1, max_fields=32) as form:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "field 'image' (a photo file) is required"
            )
        raw = [str(v) for v in form.getlist("aspect_ratios")]
        if any(len(v) > RATIO_FIELD_CHARS for v in raw):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"aspect_ratios: at most {RATIO_FIELD_CHARS} characters per field",
            )
        ratios = [r.strip() for v in raw for r in v.split(",")]
        fields = {k: form.get(k) for k in ("n", "wait") if form.get(k) not in (None, "")}
        return CropMultipartForm.model_validate(
            {"image": await upload.read(), "aspect_ratios": [r for r in ratios if r], **fields}
        )


async def _photo(
    clients: Clients, owner: str, form: CropMultipartForm | CropRequest
) -> dict[str, Any]:
    """Check the request and its photo; store an uploaded photo and record that `owner` sent it.
    Returns `checked_photo`'s dict."""
    try:
        check_crop_request(form.n, form.aspect_ratios)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    settings = clients.settings
    limit, pixels = settings.gateway.max_upload_bytes, settings.max_image_pixels
    if isinstance(form, CropMultipartForm):
        photo = await run_in_threadpool(checked_photo, form.image, "image", pixels, limit)
        await run_in_threadpool(clients.store.put, photo["key"], form.image, photo["mime"])
        await run_in_threadpool(clients.uploads.record, owner, photo["sha256"])
        return photo
    data = await run_in_threadpool(_owned_upload, clients, owner, form.image_key)
    photo = await run_in_threadpool(checked_photo, data, form.image_key, pixels, None)
    return {**photo, "key": form.image_key}


def _owned_upload(clients: Clients, owner: str, key: str) -> bytes:
    """The bytes of `owner`'s upload `key` (already matched UPLOAD_KEY_PATTERN); one 404 for a
    missing upload and for another tenant's."""
    sha = key.removeprefix("uploads/").partition(".")[0]
    try:
        if clients.uploads.owns(owner, sha):
            return clients.store.get(key)
    except ObjectNotFoundError:
        pass  # recorded, but swept from the bucket since
    raise HTTPException(status.HTTP_404_NOT_FOUND, f"no upload {key!r} of yours")


def _enqueue(
    clients: Clients, owner: str, form: CropMultipartForm | CropRequest, photo: dict[str, Any]
) -> Job:
    """Record the job, then send its chain (ids and keys only)."""
    params = {
        "image_key": photo["key"], "n": form.n, "aspect_ratios": list(form.aspect_ratios),
        "width": photo["width"], "height": photo["height"],
    }  # fmt: skip
    job = clients.jobs.create("crop", owner, params)
    message = {"job_id": job.id, "sha256": photo["sha256"], **params}
    send(clients, job, crop_chain(clients.celery, message))
    JOBS.labels("crop").inc()
    return job
