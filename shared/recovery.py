"""Crop jobs and dataset runs whose messages were lost are sent again.

Kombu's Redis transport pops a message (BRPOP) before it records it as unacknowledged
(`shared/leases.py`), so a message can vanish with its worker: one that dies between the two,
or one SIGKILLed while the kernel tears it down, whose socket still has a BRPOP waiting that
Redis answers with the next message pushed (seen: a job submitted right after the crop worker
was killed stayed "running" forever; the Redis append-only file shows its crop message popped
and never recorded). Leases cannot bring such a message back: nothing holds it any more.

So a crop job that is not over, whose record has not moved for `after_s`, and whose id is in no
message Redis holds (the queues' lists, and the deliveries recorded as unacknowledged) is sent
again from its first stage. Nothing is done twice that shows: every stage is idempotent (its
outputs go to keys derived from its input), a stage skips a job that has ended, and only a job's
first success counts. A message that is in flight at that moment (popped, not yet recorded:
microseconds) makes at worst one more run of the chain. The resend is counted on the job
(its `resent` field) and moves its `updated` time, so a job is sent again at most once per `after_s`.

Dataset runs (CAD) stall the same ways, and more: an item's message lost with a worker, or with
the last second of writes a killed Redis had not yet put in its append-only file; the wake an item
sends its planner when it finishes, lost the same way, or sent while Redis was away. A run whose
record has not moved for `after_s` (every item stage moves it) and that has items no message holds,
or nothing in flight at all, gets a planner pass in recovery mode: under the run's lock it sends
again the items no message holds (`orphaned_slots`), then plans and finishes as any pass does.
Items already made are read back, not made again, and each is counted once (`shared.runs`).
A cancelled run gets the same pass while it has lost items or has not written its manifest (the
items sent again end as cancelled; a client waits for none in flight); its record no longer moves,
so a pass may be sent once per `every_s` until one has run.

The gateway runs a pass every `every_s` seconds (`QueueSettings.recover_after_s`,
`recover_every_s`); a Redis lock lets one gateway of several run it. Index jobs are not covered
here: their planner re-plans unfinished parts when the job is submitted again.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from shared.jobs import KEY_PREFIX, TERMINAL, Job, JobStore
from shared.queue import CAD_PLAN, QUEUES, crop_chain
from shared.runs import RunState

log = logging.getLogger(__name__)
LOCK_KEY = "procrop:recover:lock"
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, key]


def held_arguments(client: redis.Redis) -> list[dict[str, Any]]:
    """The first argument of every task message Redis holds, where it is a job's (a dict with a
    `job_id`): waiting in a queue's list, or delivered and not yet acknowledged (running,
    prefetched, waiting for its ETA)."""
    raw: list[Any] = []
    for queue in QUEUES:
        raw += client.lrange(queue, 0, -1)
    raw += [json.loads(entry)[0] for entry in client.hvals(UNACKED_KEY)]
    return [args for args in map(arguments_of, raw) if args is not None]


def job_ids_in_messages(client: redis.Redis) -> set[str]:
    """The `job_id` of every task message Redis holds (see `held_arguments`)."""
    return {str(args["job_id"]) for args in held_arguments(client)}


def orphaned_slots(state: RunState, held: list[dict[str, Any]] | None = None) -> list[str]:
    """The run's unfinished items (slots) that no message Redis holds: lost, never to run.
    `held`: `held_arguments` read just before, if the caller has it."""
    held = held_arguments(state.redis) if held is None else held
    slots = {str(args.get("slot")) for args in held if args["job_id"] == state.job_id}
    return [slot for slot in state.queued_slots() if slot not in slots]


def arguments_of(message: Any) -> dict[str, Any] | None:
    """The first argument of a kombu message (JSON envelope, or its decoded dict) when it is a
    job's; None otherwise."""
    try:
        envelope = json.loads(message) if isinstance(message, str | bytes) else message
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        if args and isinstance(args[0], dict) and "job_id" in args[0]:
            return dict(args[0])
        return None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def job_id_of(message: Any) -> str | None:
    """The job a kombu message is for; None if not ours."""
    args = arguments_of(message)
    return None if args is None else str(args["job_id"])


def stalled_jobs(jobs: JobStore, after_s: float, now: float | None = None) -> Iterator[Job]:
    """Crop jobs and dataset runs that are not over (a cancelled run: maybe not wound up) and
    whose record has not moved for `after_s`."""
    now = time.time() if now is None else now
    for key in jobs.redis.scan_iter(f"{KEY_PREFIX}*", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        job_id = name.removeprefix(KEY_PREFIX)
        if ":" in job_id:  # a job's side hashes (index parts)
            continue
        raw = {_text(k): _text(v) for k, v in jobs.redis.hgetall(name).items()}
        kind, status = raw.get("kind"), raw.get("status", "queued")
        if kind not in ("crop", "dataset"):
            continue
        if status in TERMINAL and (kind, status) != ("dataset", "cancelled"):
            continue
        job = Job.from_hash(job_id, raw)
        if now - job.updated >= after_s:
            yield job


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def crop_message(job: Job) -> dict[str, Any]:
    """The first task's argument for a crop job, as the gateway sent it."""
    sha256 = job.params["image_key"].rsplit("/", 1)[1].split(".", 1)[0]
    return {"job_id": job.id, "sha256": sha256, **job.params}


def recover(jobs: JobStore, app: Any, after_s: float) -> list[str]:
    """One pass: send again every stalled crop job no message holds, and a recovery pass of the
    planner of every stalled dataset run with lost items or none in flight; returns their ids."""
    candidates = list(stalled_jobs(jobs, after_s))
    if not candidates:
        return []
    held = held_arguments(jobs.redis)
    held_jobs = {str(args["job_id"]) for args in held}
    resent = []
    for job in candidates:
        if job.kind == "crop" and job.id in held_jobs:
            continue
        if job.kind == "dataset" and not _run_needs_a_pass(jobs, job, held):
            continue
        if job.status != "cancelled" and not jobs.note_resent(job.id):
            continue  # it ended (or expired) meanwhile
        if job.kind == "crop":
            crop_chain(app, crop_message(job)).apply_async()
        else:
            app.signature(CAD_PLAN, args=(job.id,), kwargs={"recover": True}).apply_async()
        log.warning("job %s: no progress for %.0f s and work no message holds (lost with a "
                    "worker or Redis?); sent again", job.id, time.time() - job.updated)  # fmt: skip
        resent.append(job.id)
    return resent


def _run_needs_a_pass(jobs: JobStore, job: Job, held: list[dict[str, Any]]) -> bool:
    """A stalled run moves again only by a planner pass when some of its items are lost, or when
    none is in flight (the wake that would have planned more, or finished it, was lost). Items
    whose messages are held are running or waiting for a worker: their run is slow, not stuck.
    A cancelled run with none in flight needs a pass only if none has written its manifest."""
    state = RunState(jobs.redis, job.id)
    counts = state.read_counts()
    if counts.in_flight == 0:
        return job.status != "cancelled" or not counts.finalized
    return bool(orphaned_slots(state, held))


class Recoverer:
    """A daemon thread that runs `recover` every `every_s` seconds, one process at a time
    across all that share the Redis (a lock that expires with the interval)."""

    def __init__(self, jobs: JobStore, app: Any, after_s: float, every_s: float) -> None:
        self.jobs, self.app, self.after_s, self.every_s = jobs, app, after_s, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recover", daemon=True)

    def start(self) -> Recoverer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        token = secrets.token_hex(8)
        while not self._stop.wait(self.every_s):
            try:
                lock_ms = max(1, int(self.every_s * 1000 * 0.9))
                if self.jobs.redis.set(LOCK_KEY, token, nx=True, px=lock_ms):
                    recover(self.jobs, self.app, self.after_s)
            except Exception as exc:  # Redis away, a send failing: the next pass tries again
                log.warning("recovery pass failed: %s", exc)
