"""A dataset run's item accounting on a real Redis (`shared/runs.py`): what the plan script
does once the run's job has ended, a redelivered finish counted once, the planner's lock."""

from __future__ import annotations

import redis

from shared.jobs import JobStore
from shared.runs import RunState


def _entries(*names: str) -> list[tuple[str, dict[str, object]]]:
    return [(f"slot-{n}", {"photo": n, "variant": 0}) for n in names]


def test_a_plan_after_the_cancel_plans_nothing(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    jobs = JobStore(client)
    job = jobs.create("dataset", "owner", {"source": "pro/"})
    state = RunState(client, job.id)
    assert state.plan(_entries("a", "b")) == ["slot-a", "slot-b"]
    assert jobs.cancel(job.id)
    # A planner pass that read the job before the cancel still calls plan: nothing is recorded,
    # nothing is returned to send, and the counts stay those of the items already in flight.
    assert state.plan(_entries("c", "d")) == []
    assert state.plan(_entries("a")) == []  # nor is a planned, unfinished slot sent again
    counts = state.read_counts()
    assert (counts.planned, counts.in_flight) == (2, 2)
    assert state.state("slot-c") is None


def test_a_finish_counts_once_however_often_it_is_delivered(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job = JobStore(client).create("dataset", "owner", {"source": "pro/"})
    state = RunState(client, job.id)
    state.plan(_entries("a"))
    assert state.finish("slot-a", "accepted", {"photo": "a", "variant": 0})
    assert not state.finish("slot-a", "rejected", {"photo": "a", "variant": 0}, ["seam"])
    counts = state.read_counts()
    assert (counts.accepted, counts.rejected, counts.in_flight) == (1, 0, 0)
    assert state.state("slot-a") == "accepted"


def test_the_planner_lock_is_taken_back_by_its_own_task_and_refused_to_others(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    runs = RunState(client, JobStore(client).create("dataset", "owner", {"source": "pro/"}).id)
    assert runs.try_lock("task-1", 120)
    # The pass died with Redis or its worker, holding the lock; its task is delivered again.
    assert runs.try_lock("task-1", 120)
    assert not runs.redis.exists(runs.again_key)
    assert not runs.try_lock("task-2", 120)  # another pass: the holder is asked for one more
    assert runs.unlock("task-1", 120)  # ... and keeps the lock to make it
    assert not runs.unlock("task-1", 120)
    assert runs.try_lock("task-2", 120)
