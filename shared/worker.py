"""What every worker shares: its clients, the stage wrapper around each task, and its entry point.

A task is a thin shell over plain functions (`run_stage`): it marks its stage on the job record,
times it, and sorts failures into three kinds:

- bad input (an unreadable photo, a missing object, an invalid request): the job fails at once,
  with the error's one-line message; retrying cannot help;
- transient (Redis, S3 or Milvus unreachable or failing a request): retried with exponential
  backoff, up to `PROCROP_QUEUE__MAX_RETRIES`, then the job fails;
- anything else (a bug): the job fails with a short reason; the traceback goes to the worker log.

Models load once per worker process, after the fork (`load_after_fork`), never in the parent.
With `PROCROP_QUEUE__METRICS_PORT` set, the worker serves Prometheus metrics of its tasks and
stages (`shared/worker_metrics.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import numpy as np
import redis
from celery import Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared import worker_metrics
from shared.errors import (
    CollectionNotFoundError,
    IncompatibleCollectionError,
    InvalidImageError,
    ModelLoadError,
    ObjectNotFoundError,
    ProCropError,
    StorageError,
    VectorIndexError,
    one_line,
)
from shared.jobs import JobStore
from shared.queue import GPU_QUEUES, queue_of, worker_app, worker_name
from shared.settings import Settings, get_settings
from shared.storage import ObjectStore, build_object_store

log = logging.getLogger(__name__)
T = TypeVar("T")

BAD_INPUT: tuple[type[Exception], ...] = (
    InvalidImageError,
    ObjectNotFoundError,
    CollectionNotFoundError,
    IncompatibleCollectionError,
    ModelLoadError,
    ValueError,
)
TRANSIENT: tuple[type[Exception], ...] = (
    StorageError,
    VectorIndexError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
)


@functools.cache
def jobs() -> JobStore:
    settings = get_settings()
    return JobStore.from_url(settings.queue.redis_url, settings.queue.job_ttl_s)


@functools.cache
def object_store() -> ObjectStore:
    return build_object_store(get_settings())


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_stage(task: Task, job_id: str, stage: str, work: Callable[[], T]) -> T:
    """Run one stage of a job: skip it if the job is over (cancelled), record its time, and
    fail, retry or re-raise by the kind of error (see the module docstring)."""
    store = jobs()
    try:
        proceed = store.start_stage(job_id, stage, this_worker())
    except TRANSIENT as exc:
        _retry_or_fail(task, job_id, stage, exc)
    if not proceed:
        log.info("job %s is over: %s skipped", job_id, stage)
        worker_metrics.mark_outcome(task, "cancelled")
        raise Ignore()  # the rest of the chain is dropped too
    started = time.perf_counter()
    try:
        out = work()
    except BAD_INPUT as exc:
        store.fail(job_id, one_line(exc))
        worker_metrics.mark_outcome(task, "bad_input")
        raise Ignore() from None
    except TRANSIENT as exc:
        _retry_or_fail(task, job_id, stage, exc)
    except SoftTimeLimitExceeded:
        store.fail(job_id, f"{stage} took longer than {get_settings().queue.soft_time_limit_s} s")
        worker_metrics.mark_outcome(task, "timed_out")
        raise Ignore() from None
    except Exception as exc:
        log.exception("job %s: %s failed", job_id, stage)
        store.fail(job_id, f"internal error in {stage}: {type(exc).__name__}")
        worker_metrics.mark_outcome(task, "error")
        raise Ignore() from None
    seconds = time.perf_counter() - started
    store.finish_stage(job_id, stage, seconds)
    worker_metrics.observe_stage(queue_of(task.name), stage, seconds)
    return out


def chain_stage(
    task: Task, message: dict[str, Any], stage: str, output: str, work: Callable[[], Any]
) -> dict[str, Any]:
    """A stage of a job's chain: `run_stage`, then the message for the next stage, with the
    stage's output key added as `output`."""
    return {**message, output: run_stage(task, message["job_id"], stage, work)}


def _retry_or_fail(task: Task, job_id: str, stage: str, exc: Exception) -> NoReturn:
    q = get_settings().queue
    attempt = task.request.retries
    if attempt >= q.max_retries:
        jobs().fail(job_id, f"{stage} failed {attempt + 1} times: {one_line(exc)}")
        worker_metrics.mark_outcome(task, "gave_up")
        raise Ignore() from None
    delay = min(q.retry_backoff_max_s, 2**attempt)
    log.warning("job %s: %s failed (%s); retry %d in %d s", job_id, stage, exc, attempt + 1, delay)
    retry_later(task, delay, q.max_retries)


def retry_later(task: Task, countdown: float, max_retries: int | None, **options: Any) -> NoReturn:
    """`task.retry`, except when the retry cannot be sent (the broker is gone): Celery then
    rejects the message without requeueing it, and the work would be lost for good (a CAD run's
    planner pass at a Redis restart). Here the message goes back to its queue instead; delivered
    again once the broker is back, it retries from the start. `options` reach the retry's
    `apply_async`."""
    try:
        raise task.retry(countdown=countdown, max_retries=max_retries, **options)
    except Reject as rejected:
        log.warning("%s: its retry could not be sent (%s); requeued", task.name, rejected.reason)
        raise Reject(rejected.reason, requeue=True) from None


def load_after_fork(loader: Callable[[], Any]) -> None:
    """Call `loader` (a cached model getter) in each pool process as it starts, so the first
    task does not pay for loading, and the parent never holds models (or CUDA) across the fork."""

    def _load(**_: Any) -> None:
        try:
            loader()
        except ProCropError as exc:  # the first task reports it again, on its job
            log.error("could not load models: %s", exc)
            return
        if _serving is not None:  # tell `procrop stack up` (and operators) the models are in
            queue, worker_pid = _serving
            jobs().redis.set(loaded_key(queue), worker_pid, ex=24 * 3600)

    worker_process_init.connect(_load, weak=False)


def loaded_key(queue: str) -> str:
    """Redis key holding the pid of the worker of `queue` on this host whose models are loaded."""
    return f"procrop:loaded:{worker_name(queue)}"


_serving: tuple[str, int] | None = None  # (queue, worker pid) of this process's worker


def run_worker(queue: str, settings: Settings | None = None) -> None:
    """Start a Celery worker consuming `queue` (blocks until it is stopped).

    SIGTERM (`docker stop`, a pod's deletion) is Celery's warm shutdown: the worker stops taking
    messages, finishes its running task within the time limits, and returns messages it had
    reserved but not started to the queue (acknowledged late), so a scale-down loses no task.
    """
    global _serving
    _serving = (queue, os.getpid())  # pool processes inherit it
    settings = settings or get_settings()
    if settings.queue.metrics_port:
        worker_metrics.serve(settings.queue.metrics_host, settings.queue.metrics_port)
    argv = [
        "worker",
        f"--queues={queue}",
        f"--hostname={worker_name(queue)}",
        f"--concurrency={settings.queue.concurrency}",
        f"--prefetch-multiplier={1 if queue in GPU_QUEUES else 4}",
        f"--loglevel={settings.log_level}",
        f"--pool={settings.queue.pool}",
        "--without-gossip",
        "--without-mingle",
    ]
    worker_app().worker_main(argv)


def ping_worker(queue: str, timeout_s: float = 3.0) -> bool:
    """Whether this host's worker of `queue` answers (a container health check)."""
    replies = worker_app().control.ping(destination=[worker_name(queue)], timeout=timeout_s)
    return bool(replies)


def put_arrays(key: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """Store named arrays (exact float32, safetensors) under `key`."""
    payload = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    object_store().put(key, payload)


def get_arrays(key: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata `put_arrays` stored under `key`."""
    data = object_store().get(key)
    try:
        (size,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, JSON header
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        return st_load(data), meta
    except Exception as exc:  # safetensors' own error types on bad bytes
        raise StorageError(f"{object_store().uri(key)}: unreadable arrays ({exc})") from None
