"""Dataset runs' item accounting in Redis: every (photo, variant) counted once, however often its
tasks are delivered.

A run is a job (`shared/jobs.py`, kind `dataset`) plus these keys, `procrop:run:{job}:*`, kept as
long as the job record:

    slots      hash  slot -> state: queued, then one of accepted | rejected | failed | duplicate |
                     cancelled (final: a redelivered task cannot change or recount it)
    info       hash  slot -> JSON {photo, variant, item, reasons}: the manifest line
    counts     hash  planned, in_flight, accepted, rejected, failed, duplicate, cancelled,
                     reason.<r> (rejections by reason), exhausted (1 once the source is listed),
                     finalized (1 once a pass has written the manifest, labels and report)
    contents   hash  item (photo hash + variant) -> the slot that owns it (byte-identical photos
                     under two names make one item; the second slot is a duplicate)
    cursor     str   the last photo name planned (the planner lists the source after it)
    pump       str   the planner's lock (the holding task's id); `pump:again` asks the holder for
                     one more pass

A slot is `{sha256(photo name)[:16]}-v{variant}`: the planner knows names, not contents. Each
transition is one Lua script, so two deliveries racing cannot both count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.jobs import KEY_PREFIX as JOB_KEY_PREFIX

FINAL = ("accepted", "rejected", "failed", "duplicate", "cancelled")
PREFIX = "procrop:run:"

# KEYS: slots, counts, info, the job's record; ARGV: ttl, then (slot, info JSON) pairs. New slots
# become queued and counted; returns every given slot still queued (new ones and ones planned
# before but unfinished). A job that has ended (cancelled) plans nothing: checked in the same
# script as the plan, so a cancel is either before it (nothing planned) or after it (the planned
# items are in flight when the cancel lands, and each ends as cancelled when its task runs).
_PLAN = """
local status = redis.call('HGET', KEYS[4], 'status')
if status == 'cancelled' or status == 'failed' or status == 'succeeded' then return {} end
local pending = {}
for i = 2, #ARGV, 2 do
  local slot = ARGV[i]
  if redis.call('HSETNX', KEYS[1], slot, 'queued') == 1 then
    redis.call('HINCRBY', KEYS[2], 'planned', 1)
    redis.call('HINCRBY', KEYS[2], 'in_flight', 1)
    redis.call('HSET', KEYS[3], slot, ARGV[i + 1])
  end
  if redis.call('HGET', KEYS[1], slot) == 'queued' then table.insert(pending, slot) end
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return pending
"""

# KEYS: slots, counts, info; ARGV: slot, outcome, info JSON, reasons... Returns 1 when the slot
# moved from queued to `outcome` (and was counted), 0 when it had already finished or is unknown.
_FINISH = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[2], 'in_flight', -1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
for i = 4, #ARGV do redis.call('HINCRBY', KEYS[2], 'reason.' .. ARGV[i], 1) end
return 1
"""

# KEYS: contents; ARGV: item, slot, ttl. The slot that owns `item` (the first to claim it).
_CLAIM = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], ARGV[1])
"""

# KEYS: lock, again; ARGV: token, ttl. 1: the lock is ours now: it was free, or it is held under our
# own token (the same planner task delivered again after its pass died with a Redis restart or with
# its worker: without this it would wait out the TTL, and the wakes of the items finishing meanwhile
# would all be handed to the dead holder). 0: another pass holds it, and is asked for one more.
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[2])
return 0
"""

# KEYS: lock, again; ARGV: token, ttl. 1: another pass was asked for (the lock is kept, renewed);
# 0: released (or no longer ours). Atomic, so a request made while the holder finishes is not lost.
_UNLOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('DEL', KEYS[1])
return 0
"""


def slot_id(photo: str, variant: int) -> str:
    return f"{hashlib.sha256(photo.encode()).hexdigest()[:16]}-v{variant}"


@dataclass(frozen=True)
class RunCounts:
    planned: int = 0
    in_flight: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    duplicate: int = 0
    cancelled: int = 0
    exhausted: bool = False
    finalized: bool = False
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return self.accepted + self.rejected + self.failed + self.duplicate + self.cancelled

    def to_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned, "in_flight": self.in_flight, "finished": self.finished,
            "accepted": self.accepted, "rejected": self.rejected, "failed": self.failed,
            "duplicate": self.duplicate, "cancelled": self.cancelled,
            "rejected_by_reason": dict(sorted(self.reasons.items())),
            "source_listed": self.exhausted,
        }  # fmt: skip


class RunState:
    """The item accounting of one run (see the module docstring)."""

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis, self.job_id, self.ttl_s = client, job_id, ttl_s
        base = PREFIX + job_id
        self.slots, self.counts, self.info = f"{base}:slots", f"{base}:counts", f"{base}:info"
        self.contents, self.cursor_key = f"{base}:contents", f"{base}:cursor"
        self.lock_key, self.again_key = f"{base}:pump", f"{base}:pump:again"
        self._plan = client.register_script(_PLAN)
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)
        self._lock = client.register_script(_LOCK)
        self._unlock = client.register_script(_UNLOCK)

    def plan(self, entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Record (slot, manifest info) entries; returns the slots still to run (none once the
        run's job has ended)."""
        args: list[Any] = [self.ttl_s]
        for slot, info in entries:
            args += [slot, json.dumps({**info, "status": "queued"}, sort_keys=True)]
        keys = [self.slots, self.counts, self.info, JOB_KEY_PREFIX + self.job_id]
        pending = self._plan(keys=keys, args=args)
        return [str(s) for s in pending]

    def finish(
        self, slot: str, outcome: str, info: dict[str, Any], reasons: Sequence[str] = ()
    ) -> bool:
        """Move `slot` to its final `outcome`, once; False if it had already finished."""
        if outcome not in FINAL:
            raise ValueError(f"unknown outcome {outcome!r}")
        args = [slot, outcome, json.dumps({**info, "status": outcome}, sort_keys=True), *reasons]
        return bool(int(self._finish(keys=[self.slots, self.counts, self.info], args=args)))

    def state(self, slot: str) -> str | None:
        value = self.redis.hget(self.slots, slot)
        return None if value is None else str(value)

    def slot_infos(self, slots: Sequence[str]) -> list[dict[str, Any]]:
        """The manifest info recorded for each of `slots` (photo, variant...)."""
        if not slots:
            return []
        raw = self.redis.hmget(self.info, list(slots))
        return [json.loads(value) if value else {} for value in raw]

    def queued_slots(self) -> list[str]:
        """Every slot planned and not finished."""
        return [
            str(s)
            for s, state in self.redis.hscan_iter(self.slots, count=1000)
            if state == "queued"
        ]

    def claim(self, item: str, slot: str) -> str:
        """The slot that owns `item`: `slot` itself unless another slot claimed it first."""
        return str(self._claim(keys=[self.contents], args=[item, slot, self.ttl_s]))

    def read_counts(self) -> RunCounts:
        raw = {str(k): int(v) for k, v in self.redis.hgetall(self.counts).items()}
        reasons = {k[len("reason.") :]: v for k, v in raw.items() if k.startswith("reason.")}
        names = ("planned", "in_flight", "accepted", "rejected", "failed", "duplicate", "cancelled")
        return RunCounts(
            **{n: raw.get(n, 0) for n in names},
            exhausted=bool(raw.get("exhausted")),
            finalized=bool(raw.get("finalized")),
            reasons=reasons,
        )

    def manifest(self) -> Iterator[dict[str, Any]]:
        """Every planned slot's manifest line (slot order is the hash's, not the source's)."""
        for slot, info in self.redis.hscan_iter(self.info, count=1000):
            yield {"slot": str(slot), **json.loads(info)}

    # --- the planner's cursor and lock -------------------------------------------------------

    def cursor(self) -> str:
        value = self.redis.get(self.cursor_key)
        return "" if value is None else str(value)

    def advance(self, cursor: str, exhausted: bool) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self.cursor_key, cursor, ex=self.ttl_s)
            if exhausted:
                pipe.hset(self.counts, "exhausted", 1)
            pipe.expire(self.counts, self.ttl_s)
            pipe.execute()

    def mark_finalized(self) -> None:
        """The run's manifest, labels and report are written (a cancelled run's, too)."""
        with self.redis.pipeline() as pipe:
            pipe.hset(self.counts, "finalized", 1)
            pipe.expire(self.counts, self.ttl_s)
            pipe.execute()

    def try_lock(self, token: str, ttl_s: int) -> bool:
        """Take the planner's lock (or take it back: it is held under `token`); when another
        holds it, ask the holder for one more pass instead. Give the planner task's id as
        `token`, so a redelivery of a pass that died holding the lock is not locked out."""
        return bool(int(self._lock(keys=[self.lock_key, self.again_key], args=[token, ttl_s])))

    def unlock(self, token: str, ttl_s: int) -> bool:
        """Release the lock; True (and the lock kept) if another pass was asked for meanwhile."""
        return bool(int(self._unlock(keys=[self.lock_key, self.again_key], args=[token, ttl_s])))
