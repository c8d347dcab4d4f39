"""The stage wrapper every task runs in, inside a real Celery worker on a real Redis broker:
transient failures are retried with backoff, bad input fails the job at once, a cancelled job's
stage does not run, and a successful stage records its time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from procrop.servers import ServerProcess
from shared import worker
from shared.errors import InvalidImageError, StorageError
from shared.jobs import Job, JobStore
from shared.queue import create_app
from shared.settings import get_settings, load_settings

FAILURES: dict[str, int] = {}  # job id -> transient failures still to raise


@pytest.fixture(scope="module")
def redis_url(redis_server: ServerProcess) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/3"  # a database of this module's own


@pytest.fixture(scope="module")
def app(redis_url: str) -> Iterator[Celery]:
    """A worker (solo pool, in a thread) whose tasks run `run_stage` against this Redis."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROCROP_QUEUE__REDIS_URL", redis_url)
        patch.setenv("PROCROP_QUEUE__MAX_RETRIES", "2")
        for cached in (get_settings, worker.jobs):
            cached.cache_clear()
        yield from _worker(create_app(load_settings()))
    for cached in (get_settings, worker.jobs):
        cached.cache_clear()


def _worker(app: Celery) -> Iterator[Celery]:

    @app.task(name="procrop.embed.flaky", bind=True)
    def flaky(task: Any, job_id: str) -> str:
        return worker.run_stage(task, job_id, "embed", lambda: _flaky_work(job_id))

    @app.task(name="procrop.embed.bad_photo", bind=True)
    def bad_photo(task: Any, job_id: str) -> None:
        def work() -> None:
            raise InvalidImageError("photo.jpg: not a readable JPEG, PNG or WebP image")

        worker.run_stage(task, job_id, "embed", work)

    with start_worker(app, perform_ping_check=False, queues=["embed"]):
        yield app


def _flaky_work(job_id: str) -> str:
    if FAILURES.get(job_id, 0) > 0:
        FAILURES[job_id] -= 1
        raise StorageError("S3 at 127.0.0.1:1: connection refused")
    return "done"


def _wait(store: JobStore, job_id: str, ready: Any, timeout_s: float = 20) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if ready(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {store.get(job_id)}")


def test_transient_failures_are_retried_with_backoff(app: Celery, redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    job = store.create("test", "owner", {})
    FAILURES[job.id] = 2
    started = time.monotonic()
    app.send_task("procrop.embed.flaky", args=(job.id,))
    done = _wait(store, job.id, lambda j: "embed" in j.timings)
    assert done.deliveries["embed"] == 3  # two failures, then success
    assert done.status == "running"  # a stage alone does not finish its job
    assert time.monotonic() - started >= 1 + 2 - 0.5  # backoff 1 s, then 2 s


def test_transient_failures_past_the_retry_limit_fail_the_job(app: Celery, redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    job = store.create("test", "owner", {})
    FAILURES[job.id] = 10
    app.send_task("procrop.embed.flaky", args=(job.id,))
    failed = _wait(store, job.id, lambda j: j.finished)
    assert failed.status == "failed"
    assert failed.deliveries["embed"] == 3  # the first try and PROCROP_QUEUE__MAX_RETRIES=2
    assert failed.error == "embed failed 3 times: S3 at 127.0.0.1:1: connection refused"


def test_bad_input_fails_at_once_without_retry(app: Celery, redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    job = store.create("test", "owner", {})
    app.send_task("procrop.embed.bad_photo", args=(job.id,))
    failed = _wait(store, job.id, lambda j: j.finished)
    assert failed.status == "failed"
    assert failed.error == "photo.jpg: not a readable JPEG, PNG or WebP image"
    time.sleep(1.5)  # a retry would come after 1 s
    assert store.get(job.id).deliveries["embed"] == 1


def test_a_cancelled_job_stage_does_not_run(app: Celery, redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    job = store.create("test", "owner", {})
    FAILURES[job.id] = 0
    store.cancel(job.id)
    app.send_task("procrop.embed.flaky", args=(job.id,))
    skipped = _wait(store, job.id, lambda j: j.deliveries.get("embed") == 1)
    time.sleep(0.3)
    assert skipped.status == "cancelled"
    assert "embed" not in store.get(job.id).timings
