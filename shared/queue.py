"""The Celery app every service shares: queues, routing by task name, and delivery guarantees.

Task names say where they run: `procrop.<queue>.<what>` goes to queue `<queue>`, one queue per kind
of worker (`services/<service>/worker.py`):

    embed     composition tokens + index vector (+ BLIP text, paper profile)   GPU
    retrieve  top-K compositions from Milvus, with their tokens and crops      CPU
    crop      the crop model and its post-processing                           GPU
    outpaint  ControlNet out-painting for CAD generation                       GPU
    index     ingesting a collection into Milvus, one batch of photos a task   CPU

Delivery, and why it is safe. Every task is idempotent: its outputs go to keys derived from its
input, so running it again rewrites the same objects. Messages are acknowledged late
(`acks_late`): only after the task returned, its outputs were written and the next message of
its chain was sent. A task whose pool process dies is re-queued at once
(`reject_on_worker_lost`). A task whose whole worker is gone (SIGKILL, lost node) stays in Redis
unacknowledged until its lease runs out: each worker renews, every few seconds, the lease of
every message it holds (`shared/leases.py`), and any live worker returns to their queue the
messages whose lease is older than the visibility timeout (kombu's own `restore_visible`, run
every `visibility_timeout / 6` s). So a dead worker's tasks come back within about 35 s (30 s
lease by default), while a live worker keeps a task for as long as it runs.

At least once, never done twice: a message can be delivered again (its worker died after the
work but before the acknowledgement; its worker missed four lease renewals in a row; Redis lost
its last second of writes), and then the stage runs again and writes the same objects. What a
job reports cannot change: job records (`shared/jobs.py`) move by atomic scripts whose end
states are final, a stage skips a job that has ended (`shared.worker.run_stage`), and only the
first `succeed` of a job takes effect, so one job gets one result, however often its tasks ran.

Broker outages: workers reconnect forever (`broker_connection_max_retries=None`); tasks running
when the connection drops are cancelled (they could not be acknowledged) and come back through
their leases (`ProCropConsumer`: tidying up, acknowledging or rejecting on the dead
connection never stops the worker); messages a task sends retry for about a minute before the
task gives up; with Redis's append-only file (`deploy/redis/redis.conf`) queued and
unacknowledged messages and job records survive a restart. Arguments are ids and object keys, JSON only; results live in the
object store and job records in Redis, so Celery keeps no results.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Queue

from shared.leases import LeaseKeeper
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUES = ("embed", "retrieve", "crop", "outpaint", "index")
GPU_QUEUES = frozenset({"embed", "crop", "outpaint"})  # one task at a time per process

EMBED = "procrop.embed.features"
RETRIEVE = "procrop.retrieve.neighbors"
CROP = "procrop.crop.predict"
CROP_BATCH = "procrop.crop.batch"  # many photos by object key -> JSON lines (pseudo-label rounds)
INDEX_PLAN = "procrop.index.plan"
INDEX_BATCH = "procrop.index.batch"
CAD_PLAN = "procrop.index.cad_plan"  # a CAD run's planner: lists the source, keeps items in flight
CAD_DESCRIBE = "procrop.embed.cad_describe"  # one item: masks + description (SAM, BLIP)
CAD_FILL = "procrop.outpaint.cad_fill"  # one item: out-paint + quality filter


def crop_chain(app: Celery, message: dict[str, Any]) -> Any:
    """A crop job's tasks, `message` (its id, the photo's key and hash, the request) first."""
    from celery import chain

    return chain(
        app.signature(EMBED, args=(message,)), app.signature(RETRIEVE), app.signature(CROP)
    )


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


class ProCropConsumer(Consumer):
    """Celery's consumer, but losing the broker under a running task does not stop the worker.

    On a connection error Celery 5.7 collects the broken connection (which detaches its
    transport from it) and then closes it. When the first close was cut short by the dead socket
    (a BRPOP waiting: the index worker's prefetch of 4 leaves one open while a task runs), the
    second restores the running task's message with no broker address left, kombu raises
    AttributeError, which `ignore_errors` lets through, and the worker exits ("Unrecoverable
    error"; seen in CI after the stack's Redis was SIGKILLed). That close only tidies a dead
    connection: skipping it loses nothing, as the message is still Redis's unacknowledged one and
    its lease brings it back.
    """

    def call_soon_ack(self, p: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Every acknowledgement and rejection of a task message passes here (`message.ack_log_error`
        or `reject_log_error`, scheduled on the event loop): settle it where its channel is open."""
        return super().call_soon_ack(settle_if_open(p), *args, **kwargs)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            close = connection.close

            def close_broken() -> None:
                try:
                    close()
                except AttributeError as error:
                    log.warning("broken broker connection not closed cleanly (%s); the "
                                "messages it held come back through their leases", error)  # fmt: skip

            connection.close = close_broken  # what Celery's handler calls
        super().on_connection_error_after_connected(exc)


def settle_if_open(settle: Callable[..., Any]) -> Callable[..., None]:
    """`settle` (a message's `ack_log_error` or `reject_log_error`), except that a message whose
    channel lost its connection is left as it is instead of stopping the worker.

    When Redis goes away the consumer closes its connection and kombu sets each channel's
    connection to None. An acknowledgement or rejection of a message delivered on that channel
    that runs later (a task that ended after the loss; a retry that could not be sent and rejects
    its message back to the queue) must build a Redis client from that connection, and kombu
    raises AttributeError, which its `*_log_error` does not catch (only connection errors) and the
    worker treats as unrecoverable ("Unrecoverable error: AttributeError(\"'NoneType' object has
    no attribute 'hostname'\")", seen in CI after the stack's Redis was SIGKILLed). Nothing is
    lost by leaving it: the message is still Redis's unacknowledged one (or was restored to its
    queue as the channel closed) and comes back through its lease; tasks are idempotent.
    """

    @functools.wraps(settle)
    def settle_or_leave(*args: Any, **kwargs: Any) -> None:
        try:
            settle(*args, **kwargs)
        except AttributeError:
            message = getattr(settle, "__self__", None)
            channel = getattr(message, "channel", None)
            if channel is None or getattr(channel, "connection", None) is not None:
                raise  # an open channel: a real bug, not a lost connection
            log.warning("message %s: broker connection lost before it was settled; its lease "
                        "brings it back", getattr(message, "delivery_tag", "?"))  # fmt: skip

    return settle_or_leave


def create_app(settings: Settings) -> Celery:
    """A Celery app on `settings.queue.redis_url` with the project's routing and guarantees."""
    q = settings.queue
    app = Celery(
        "procrop",
        broker=q.redis_url,
        set_as_current=False,
    )
    app.conf.update(
        worker_consumer=f"{__name__}:ProCropConsumer",
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
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # a worker never gives up on its broker (default 100)
        # What a task sends (the next stage of its chain, a retry) waits out about a minute of
        # broker outage instead of ~1 s; the gateway passes its own, short policy.
        task_publish_retry_policy=dict(
            max_retries=60, interval_start=0, interval_step=0.5, interval_max=1
        ),
        broker_transport_options={
            "visibility_timeout": q.visibility_timeout_s,  # the lease: see shared/leases.py
            # Return dead workers' tasks every few seconds (kombu's default is ~100 s).
            "unacked_restore_interval": max(1, q.visibility_timeout_s // 6),
            "unacked_restore_throttle": 1,
            # The lock one restorer holds: left behind by a process killed while restoring (or
            # by Redis killed between its SET and DEL, the append-only file keeping it), it
            # would stop every restore for kombu's default 300 s. Restoring is safe without it
            # (each message moves in its own WATCHed transaction), so it may expire soon.
            "unacked_mutex_expire": max(5, q.visibility_timeout_s // 3),
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "health_check_interval": 25,
            # One Redis list per queue, named as the queue: kombu would otherwise split a queue
            # by message priority into `queue`, `queue\x06\x163`, ... lists, and an autoscaler
            # watching the list `queue` (deploy/k8s, KEDA) would miss prioritised tasks.
            "priority_steps": [0],
        },
        broker_pool_limit=64,  # the gateway sends from many threads
    )
    app.steps["consumer"].add(LeaseKeeper)  # workers renew the leases of what they hold
    return app


@functools.cache
def worker_app() -> Celery:
    """The app of this process (workers), configured from the environment once."""
    return create_app(get_settings())


def worker_name(queue: str) -> str:
    """A worker's node name: one worker per queue per host."""
    return f"{queue}@{socket.gethostname()}"
