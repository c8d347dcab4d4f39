"""Job records in Redis: what the gateway reports about a crop or indexing job while workers run it.

One hash per job, `procrop:job:{id}`, kept `ttl_s` after its last change:

    kind, owner, status, params (JSON), created, updated, error, result_key,
    t.<stage> (seconds the stage ran), n.<stage> (times the stage was delivered),
    s.<stage> (Unix time the stage last started), worker,
    progress.total, progress.done

Status moves queued -> running -> succeeded | failed, or to cancelled from queued or running;
the three end states are final (a late or redelivered task cannot undo them). Each transition is
one Lua script, so two workers racing (a redelivered task beside a slow one) cannot interleave.
Finished jobs are announced on the channel `procrop:job-done:{id}` for waiting clients.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from shared.errors import ProCropError

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
KEY_PREFIX = "procrop:job:"
DONE_CHANNEL = "procrop:job-done:"

# KEYS[1] job hash; ARGV: new status, ttl, now, a counter to increment even on an ended job ('' for
# none), then field / value pairs to set with it. Returns 1 when the job moved, 0 if it had ended, -1 if it is missing
# (and then writes nothing: no half-made record without a TTL).
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[4], 1) end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] job hash; ARGV: field / value pairs, set only if the job exists. Returns 1 or 0.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS[1] job hash; ARGV: now. A job not over counts one more resend and moves its `updated` time
# (shared/recovery.py). Returns 1, or 0 if the job has ended or is missing.
_RESENT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
redis.call('HINCRBY', KEYS[1], 'resent', 1)
redis.call('HSET', KEYS[1], 'updated', ARGV[1])
return 1
"""

# KEYS[1] job hash, KEYS[2] its parts hash; ARGV: part, item count, ttl. Records the part once,
# writes the sum of all parts as progress.done and returns {done, total}, in one step.
_PART_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local done = 0
for _, count in ipairs(redis.call('HVALS', KEYS[2])) do done = done + tonumber(count) end
redis.call('HSET', KEYS[1], 'progress.done', done)
return {done, tonumber(redis.call('HGET', KEYS[1], 'progress.total') or '0')}
"""


class JobNotFoundError(ProCropError):
    """No job has this id (or it expired)."""


@dataclass(frozen=True)
class Job:
    """A job as recorded; `timings` maps stage -> seconds, `deliveries` stage -> count."""

    id: str
    kind: str
    owner: str
    status: Status
    params: dict[str, Any]
    created: float
    updated: float
    error: str | None = None
    result_key: str | None = None
    worker: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # stage -> Unix time it last started
    progress: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[str, str]) -> Job:
        def prefixed(prefix: str, cast: Any) -> dict[str, Any]:
            return {k[len(prefix) :]: cast(v) for k, v in raw.items() if k.startswith(prefix)}

        return cls(
            id=job_id,
            kind=raw.get("kind", ""),
            owner=raw.get("owner", ""),
            status=raw.get("status", "queued"),  # type: ignore[arg-type]
            params=json.loads(raw.get("params", "{}")),
            created=float(raw.get("created", 0)),
            updated=float(raw.get("updated", 0)),
            error=raw.get("error") or None,
            result_key=raw.get("result_key") or None,
            worker=raw.get("worker") or None,
            timings=prefixed("t.", float),
            deliveries=prefixed("n.", int),
            started=prefixed("s.", float),
            progress=prefixed("progress.", int),
        )


class JobStore:
    """Create, read and advance job records; safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis, self.ttl_s = client, ttl_s
        self._transition = client.register_script(_TRANSITION)
        self._update = client.register_script(_UPDATE)
        self._part_done = client.register_script(_PART_DONE)
        self._resent = client.register_script(_RESENT)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 7 * 24 * 3600) -> JobStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30
        )
        return cls(client, ttl_s)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def create(self, kind: str, owner: str, params: dict[str, Any], job_id: str = "") -> Job:
        """Record a new queued job; returns it."""
        job_id = job_id or self.new_id()
        now = time.time()
        mapping: dict[str, str | float] = {
            "kind": kind, "owner": owner, "status": "queued",
            "params": json.dumps(params, sort_keys=True), "created": now, "updated": now,
        }  # fmt: skip
        key = KEY_PREFIX + job_id
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]  # redis-py's Mapping is invariant
            pipe.expire(key, self.ttl_s)
            pipe.execute()
        return Job.from_hash(job_id, {k: str(v) for k, v in mapping.items()})

    def get(self, job_id: str) -> Job:
        """The job's record; raises `JobNotFoundError`."""
        raw = self.redis.hgetall(KEY_PREFIX + job_id) if _plausible(job_id) else {}
        if not raw:
            raise JobNotFoundError(f"no job {job_id!r}")
        return Job.from_hash(job_id, raw)  # type: ignore[arg-type]

    def start_stage(self, job_id: str, stage: str, worker: str) -> bool:
        """Mark the job running in `stage` and count the delivery; False if the job is over
        (cancelled, failed...). Raises `JobNotFoundError` for an unknown job."""
        started = {f"s.{stage}": time.time()}
        return (
            self._move(job_id, "running", f"n.{stage}", stage=stage, worker=worker, **started) == 1
        )

    def finish_stage(self, job_id: str, stage: str, seconds: float) -> None:
        self._set(job_id, **{f"t.{stage}": round(seconds, 6)})

    def succeed(self, job_id: str, result_key: str) -> bool:
        """Final: the result is at `result_key`. False if the job had already ended."""
        return self._finish(job_id, "succeeded", result_key=result_key, error="")

    def fail(self, job_id: str, error: str) -> bool:
        """Final: the job failed with `error` (one line for the client)."""
        return self._finish(job_id, "failed", error=error[:2000])

    def cancel(self, job_id: str) -> bool:
        """Final: cancelled. False if the job had already ended."""
        return self._finish(job_id, "cancelled", error="cancelled by the client")

    def note_resent(self, job_id: str) -> bool:
        """Count a resend of a job not over (and move its `updated` time); False if it ended."""
        return int(self._resent(keys=[KEY_PREFIX + job_id], args=[time.time()])) == 1

    def set_progress(self, job_id: str, total: int) -> None:
        self._set(job_id, **{"progress.total": total, "progress.done": 0})

    def mark_part_done(self, job_id: str, part: str, count: int) -> tuple[int, int]:
        """Record part `part` (of `count` items) as done, once however often it is delivered;
        returns (items done, items in all)."""
        keys = [KEY_PREFIX + job_id, f"{KEY_PREFIX}{job_id}:parts"]
        done, total = self._part_done(keys=keys, args=[part, count, self.ttl_s])
        if int(done) < 0:
            raise JobNotFoundError(f"no job {job_id!r}")
        return int(done), int(total)

    def _set(self, job_id: str, **fields: Any) -> None:
        args = [item for pair in fields.items() for item in pair]
        if not int(self._update(keys=[KEY_PREFIX + job_id], args=args)):
            raise JobNotFoundError(f"no job {job_id!r}")

    def _finish(self, job_id: str, status: Status, **fields: Any) -> bool:
        moved = self._move(job_id, status, **fields) == 1
        if moved:
            self.redis.publish(DONE_CHANNEL + job_id, status)
        return moved

    def _move(self, job_id: str, status: Status, count: str = "", **fields: Any) -> int:
        argv: list[Any] = [status, self.ttl_s, time.time(), count]
        for name, value in fields.items():
            argv += [name, value]
        result = int(self._transition(keys=[KEY_PREFIX + job_id], args=argv))
        if result < 0:
            raise JobNotFoundError(f"no job {job_id!r}")
        return result


def _plausible(job_id: str) -> bool:
    """Job ids are 32 hex digits; anything else cannot name a job (and never reaches Redis)."""
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)
