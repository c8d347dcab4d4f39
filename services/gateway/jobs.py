"""Jobs as the gateway sees them: owned by an API key, waited for, answered with their results."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import HTTPException, status
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import Clients
from shared.errors import ObjectNotFoundError
from shared.jobs import DONE_CHANNEL, Job, JobNotFoundError


async def owned_job(clients: Clients, job_id: str, owner: str, kind: str | None = None) -> Job:
    """The job, if `owner` made it (and it is of `kind`); 404 otherwise, whoever else made it."""
    try:
        job = await run_in_threadpool(clients.jobs.get, job_id)
    except JobNotFoundError:
        job = None
    if job is None or job.owner != owner or (kind is not None and job.kind != kind):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no {kind + ' ' if kind else ''}job {job_id!r}"
        )
    return job


async def wait_for(clients: Clients, job_id: str, timeout_s: float) -> Job:
    """The job once it has finished, or as it is after `timeout_s` seconds."""
    if timeout_s > 0:
        async with clients.redis_async.pubsub() as pubsub:
            await pubsub.subscribe(DONE_CHANNEL + job_id)  # before looking: no missed message
            job = await run_in_threadpool(clients.jobs.get, job_id)
            if not job.finished:
                await _next_message(pubsub, timeout_s)
    return await run_in_threadpool(clients.jobs.get, job_id)


async def _next_message(pubsub: Any, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            return


async def result_of(clients: Clients, job: Job) -> dict[str, Any] | None:
    """The stored result of a succeeded job (a crop result or an index report)."""
    if job.status != "succeeded" or not job.result_key:
        return None
    try:
        data = await run_in_threadpool(clients.store.get, job.result_key)
    except ObjectNotFoundError:
        return None  # expired or removed from the bucket: the record outlived it
    result: dict[str, Any] = json.loads(data)
    return result


def timings(job: Job) -> dict[str, float]:
    return {stage: round(seconds, 4) for stage, seconds in job.timings.items()}


def send(clients: Clients, job: Job, signature: Any) -> None:
    """Send a job's first task; a job whose task never left fails at once (not queued forever)."""
    try:
        signature.apply_async(retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
    except Exception as exc:
        clients.jobs.fail(job.id, f"could not queue the job: {exc}")
        raise
