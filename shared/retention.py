"""Retention: job outputs and uploads go when the Redis records that need them have expired.

    procrop sweep          # run it hourly: cron, a Kubernetes CronJob; prints what it deleted

Two kinds of objects are kept only as long as something refers to them, both keyed on the job
TTL (`PROCROP_QUEUE__JOB_TTL_S`, 7 days by default):

- `jobs/{id}/...` (neighbours, results, index plans and reports): while the job's record
  `procrop:job:{id}` lives; records expire `job_ttl_s` after their last change;
- `uploads/{sha256}.{ext}`: while some tenant's upload record `procrop:upload:{owner}:{sha256}`
  lives (written on every upload of that photo, expiring `job_ttl_s` later; shared/ownership.py).

Mark, then sweep: an unreferenced object is first marked (hash `procrop:sweep:marks`, key ->
when), and deleted by a later sweep at least `grace_s` after the mark if it is still
unreferenced. The gateway writes an upload before its record, and a job's record before its
objects, so an object seen unreferenced for a moment (an upload whose record is being written)
is never deleted; an object referenced again loses its mark. S3 lifecycle rules cannot express
"while a Redis key lives" (and SeaweedFS applies them per bucket only), so this is ours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from shared.jobs import KEY_PREFIX as JOB_PREFIX
from shared.ownership import UPLOAD_PREFIX
from shared.storage import ObjectStore

log = logging.getLogger(__name__)
MARKS = "procrop:sweep:marks"
DEFAULT_GRACE_S = 3600


@dataclass(frozen=True)
class SweepReport:
    deleted: int  # objects deleted now
    marked: int  # unreferenced objects awaiting their grace period


def unreferenced(store: ObjectStore, client: redis.Redis) -> set[str]:
    """Keys under `jobs/` and `uploads/` that no live job or upload record refers to."""
    live_uploads = {
        _text(key).rsplit(":", 1)[1] for key in client.scan_iter(f"{UPLOAD_PREFIX}*", count=1000)
    }
    found = {key for key in store.list("uploads/") if _upload_sha(key) not in live_uploads}
    job_alive: dict[str, bool] = {}
    for key in store.list("jobs/"):
        job_id = key.split("/")[1]
        if job_id not in job_alive:
            job_alive[job_id] = bool(client.exists(JOB_PREFIX + job_id))
        if not job_alive[job_id]:
            found.add(key)
    return found


def sweep(
    store: ObjectStore, client: redis.Redis, grace_s: float = DEFAULT_GRACE_S, now: float = 0
) -> SweepReport:
    """Delete objects unreferenced since a mark at least `grace_s` old; mark the new ones."""
    now = now or time.time()
    candidates = unreferenced(store, client)
    marks = {_text(k): float(v) for k, v in client.hgetall(MARKS).items()}
    due = sorted(key for key in candidates if key in marks and marks[key] <= now - grace_s)
    for key in due:
        store.delete(key)
    with client.pipeline() as pipe:
        stale = [key for key in marks if key not in candidates or key in due]
        if stale:
            pipe.hdel(MARKS, *stale)  # deleted, or referenced again
        for key in candidates.difference(due, marks):
            pipe.hset(MARKS, key, now)
        pipe.execute()
    log.info("sweep: %d objects deleted, %d marked", len(due), len(candidates) - len(due))
    return SweepReport(deleted=len(due), marked=len(candidates) - len(due))


def _upload_sha(key: str) -> str:
    return key.removeprefix("uploads/").split(".", 1)[0]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
