"""The Celery app every service shares: queues, routing by task name, and delivery guarantees.

Task names say where they run: `procrop.<queue>.<what>` goes to queue `<queue>`, one queue per kind
of worker (`services/<service>/worker.py`):

    embed     composition tokens + index vector (+ BLIP text, paper profile)   GPU
    retrieve  top-K compositions from Milvus, with their tokens and crops      CPU
    crop      the crop model and its post-processing                           GPU
    outpaint  ControlNet out-painting for CAD generation                       GPU
    index     ingesting a collection into Milvus, one batch of photos a task   CPU

Every task is idempotent (its output key derives from its input), so messages are acknowledged
late and re-queued when a worker dies mid-task (`acks_late`, `reject_on_worker_lost`); a task
killed with its whole worker comes back after the Redis visibility timeout, which settings keep
longer than the hard time limit. Arguments are ids and object keys, JSON only; results live in the
object store and job records in Redis (`shared/jobs.py`), so Celery keeps no results.
"""

from __future__ import annotations

import functools
import socket
from typing import Any

from celery import Celery
from kombu import Queue

from shared.settings import Settings, get_settings

QUEUES = ("embed", "retrieve", "crop", "outpaint", "index")
GPU_QUEUES = frozenset({"embed", "crop", "outpaint"})  # one task at a time per process

EMBED = "procrop.embed.features"
RETRIEVE = "procrop.retrieve.neighbors"
CROP = "procrop.crop.predict"
INDEX_PLAN = "procrop.index.plan"
INDEX_BATCH = "procrop.index.batch"


def queue_of(task_name: str) -> str:
    """The queue a task name routes to (`procrop.<queue>.<what>`)."""
    parts = task_name.split(".")
    if len(parts) < 3 or parts[0] != "procrop" or parts[1] not in QUEUES:
        raise ValueError(f"task name {task_name!r} is not procrop.<queue>.<what>")
    return parts[1]


def _route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    """Celery router: by task name, so senders need not import the task's code."""
    try:
        return {"queue": queue_of(name)}
    except ValueError:
        return None  # not ours: Celery's default queue


def create_app(settings: Settings) -> Celery:
    """A Celery app on `settings.queue.redis_url` with the project's routing and guarantees."""
    q = settings.queue
    app = Celery("procrop", broker=q.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results go to the object store, job state to shared.jobs
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="embed",
        task_routes=(_route,),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # a failed task is recorded on its job, not retried
        task_time_limit=q.time_limit_s,
        task_soft_time_limit=q.soft_time_limit_s,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": q.visibility_timeout_s,
            # Scan for tasks of dead workers every few seconds (kombu's default is ~100 s).
            "unacked_restore_interval": max(1, min(10, q.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "health_check_interval": 25,
        },
        broker_pool_limit=64,  # the gateway sends from many threads
    )
    return app


@functools.cache
def worker_app() -> Celery:
    """The app of this process (workers), configured from the environment once."""
    return create_app(get_settings())


def worker_name(queue: str) -> str:
    """A worker's node name: one worker per queue per host."""
    return f"{queue}@{socket.gethostname()}"
