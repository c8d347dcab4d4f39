"""Any job, crop or index: GET /v1/jobs/{job_id} (status, progress, result)."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.deps import ClientsDep, Owner
from services.gateway.jobs import owned_job, result_of, timings
from services.gateway.routes.crops import ERRORS
from services.gateway.schemas import Job, Progress

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=Job, responses=ERRORS, summary="Any job")
async def get(job_id: str, clients: ClientsDep, owner: Owner) -> Job:
    """A job's status, progress (photos done of all, for index jobs) and result when finished."""
    job = await owned_job(clients, job_id, owner)
    progress = Progress(**job.progress) if job.progress else Progress(done=0, total=0)
    if job.kind == "crop":
        progress = Progress(done=int(job.finished), total=1)
    return Job(
        job_id=job.id, kind=job.kind, status=job.status, progress=progress,  # type: ignore[arg-type]
        result=await result_of(clients, job), error=job.error, created=job.created,
        updated=job.updated, timings=timings(job),
    )  # fmt: skip
