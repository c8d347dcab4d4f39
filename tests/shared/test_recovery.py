"""Crop jobs and dataset runs whose messages were lost are sent again (shared/recovery.py), on a
real Redis with the real Celery app's messages: found wherever Redis holds them (a queue's list,
or delivered and unacknowledged), and sent again only when no message holds a stalled job (a
dataset run: some item, or nothing is in flight)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis
from kombu import Queue

from shared.jobs import JobStore
from shared.queue import CAD_DESCRIBE, CAD_PLAN, EMBED, create_app, crop_chain
from shared.recovery import Recoverer, job_id_of, job_ids_in_messages, orphaned_slots, recover
from shared.runs import RunState, slot_id
from shared.settings import load_settings

pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py
PARAMS = {"image_key": "uploads/" + "ab" * 32 + ".jpg", "n": 2, "aspect_ratios": ["1:1"],
          "width": 640, "height": 480}  # fmt: skip


@pytest.fixture
def app(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", redis_url)
    return create_app(load_settings())


@pytest.fixture
def jobs(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url)


def _crop_job(jobs: JobStore, app: Any, age_s: float, send: bool = True) -> str:
    job = jobs.create("crop", "owner", PARAMS)
    if send:
        crop_chain(app, {"job_id": job.id, "sha256": "ab" * 32, **PARAMS}).apply_async()
    jobs.redis.hset(f"procrop:job:{job.id}", "updated", time.time() - age_s)
    return job.id


def _embed_messages(client: redis.Redis) -> list[dict[str, Any]]:
    """The (decoded) first-task arguments waiting in the embed queue."""
    return [json.loads(m) for m in client.lrange("embed", 0, -1) if job_id_of(m)]


def test_job_ids_are_found_in_queues_and_in_unacknowledged_deliveries(
    jobs: JobStore, app: Any
) -> None:
    waiting = _crop_job(jobs, app, 0)
    delivered = _crop_job(jobs, app, 0)
    connection = app.connection_for_read()
    # The oldest message (`waiting`'s) is delivered and held unacknowledged, as by a worker.
    message = Queue("embed")(connection.default_channel).get(no_ack=False)
    assert message is not None and jobs.redis.hlen("unacked") == 1
    assert job_ids_in_messages(jobs.redis) == {waiting, delivered}
    app.send_task("procrop.index.other", args=["not a job message"])
    assert job_ids_in_messages(jobs.redis) == {waiting, delivered}
    connection.release()


def test_only_stalled_jobs_that_no_message_holds_are_sent_again(jobs: JobStore, app: Any) -> None:
    lost = _crop_job(jobs, app, 300, send=False)  # its message went with a dying worker
    queued = _crop_job(jobs, app, 300)  # waits in the queue: a backlog, not a loss
    recent = _crop_job(jobs, app, 5, send=False)  # may still be between two stages
    done = _crop_job(jobs, app, 300, send=False)
    jobs.succeed(done, "jobs/x/result.json")
    jobs.redis.hset(f"procrop:job:{done}", "updated", time.time() - 300)
    jobs.create("index", "owner", {"source": "pro/"})  # other kinds are not touched

    before = {m["headers"]["id"] for m in _embed_messages(jobs.redis)}
    assert recover(jobs, app, after_s=120) == [lost]
    new = [m for m in _embed_messages(jobs.redis) if m["headers"]["id"] not in before]
    assert len(new) == 1
    args = json.loads(base64.b64decode(new[0]["body"]))[0]
    assert args == [{"job_id": lost, "sha256": "ab" * 32, **PARAMS}]  # as the gateway sends it
    assert jobs.redis.hget(f"procrop:job:{lost}", "resent") == "1"
    # Its record moved: the next pass leaves it alone (its message is queued now anyway).
    assert recover(jobs, app, after_s=120) == []
    assert {queued, recent} & set(recover(jobs, app, after_s=120)) == set()


def test_a_job_that_ends_meanwhile_is_not_sent(jobs: JobStore, app: Any) -> None:
    job_id = _crop_job(jobs, app, 300, send=False)
    jobs.cancel(job_id)
    assert not jobs.note_resent(job_id)
    assert recover(jobs, app, after_s=120) == []


def test_recoverers_sharing_a_redis_make_one_pass_per_interval(jobs: JobStore, app: Any) -> None:
    lost = _crop_job(jobs, app, 300, send=False)
    workers = [Recoverer(jobs, app, after_s=120, every_s=1).start() for _ in range(3)]
    deadline = time.monotonic() + 20
    while jobs.redis.hget(f"procrop:job:{lost}", "resent") is None:
        assert time.monotonic() < deadline, "never sent again"
        time.sleep(0.1)
    time.sleep(2.5)  # more passes: the job's record moved, so none sends it again
    for worker in workers:
        worker.stop()
    assert jobs.redis.hget(f"procrop:job:{lost}", "resent") == "1"
    assert sum(m["headers"]["task"] == EMBED for m in _embed_messages(jobs.redis)) == 1


def _dataset_run(jobs: JobStore, app: Any, photos: list[str], sent: list[str]) -> RunState:
    """A running dataset run with `photos` planned (one variant each), the item chains of the
    photos in `sent` waiting in the embed queue, and a record that has not moved for 300 s."""
    job = jobs.create("dataset", "owner", {"source": "pro/", "variants": 1, "seed": 1})
    jobs.start_stage(job.id, "plan", "test")
    state = RunState(jobs.redis, job.id)
    state.plan([(slot_id(p, 0), {"photo": p, "variant": 0}) for p in photos])
    for photo in sent:
        message = {"job_id": job.id, "slot": slot_id(photo, 0), "photo": photo, "variant": 0}
        app.signature(CAD_DESCRIBE, args=(message,)).apply_async()
    jobs.redis.hset(f"procrop:job:{job.id}", "updated", time.time() - 300)
    return state


def _plan_messages(client: redis.Redis) -> list[dict[str, Any]]:
    """The planner messages waiting in the index queue, decoded: (args, kwargs, embed)."""
    return [
        json.loads(base64.b64decode(json.loads(m)["body"]))
        for m in client.lrange("index", 0, -1)
        if json.loads(m)["headers"]["task"] == CAD_PLAN
    ]


def test_a_run_item_is_lost_when_no_message_holds_it(jobs: JobStore, app: Any) -> None:
    state = _dataset_run(jobs, app, ["a.jpg", "b.jpg", "c.jpg"], sent=["a.jpg", "b.jpg"])
    connection = app.connection_for_read()
    message = Queue("embed")(connection.default_channel).get(no_ack=False)  # a.jpg, delivered
    assert message is not None and jobs.redis.hlen("unacked") == 1
    assert orphaned_slots(state) == [slot_id("c.jpg", 0)]
    state.finish(slot_id("c.jpg", 0), "failed", {"photo": "c.jpg", "variant": 0})
    assert orphaned_slots(state) == []  # a finished item is not lost
    connection.release()


def test_a_stalled_run_with_a_lost_item_gets_a_recovery_pass_of_its_planner(
    jobs: JobStore, app: Any
) -> None:
    lost = _dataset_run(jobs, app, ["a.jpg", "b.jpg"], sent=["a.jpg"])
    slow = _dataset_run(jobs, app, ["a.jpg", "b.jpg"], sent=["a.jpg", "b.jpg"])  # all held
    idle = _dataset_run(jobs, app, ["a.jpg"], sent=[])  # its one item finished, the wake lost
    idle.finish(slot_id("a.jpg", 0), "accepted", {"photo": "a.jpg", "variant": 0})

    assert sorted(recover(jobs, app, after_s=120)) == sorted([lost.job_id, idle.job_id])
    assert sorted(args for args, kwargs, _ in _plan_messages(jobs.redis)) == sorted(
        [[lost.job_id], [idle.job_id]]
    )
    assert all(kwargs == {"recover": True} for _, kwargs, _ in _plan_messages(jobs.redis))
    assert jobs.redis.hget(f"procrop:job:{slow.job_id}", "resent") is None
    assert recover(jobs, app, after_s=120) == []  # their records moved: once per after_s


def test_a_cancelled_run_gets_a_pass_until_it_is_wound_up(jobs: JobStore, app: Any) -> None:
    lost = _dataset_run(jobs, app, ["a.jpg", "b.jpg"], sent=["a.jpg"])
    wound_up = _dataset_run(jobs, app, ["a.jpg"], sent=[])
    wound_up.finish(slot_id("a.jpg", 0), "cancelled", {"photo": "a.jpg", "variant": 0})
    wound_up.mark_finalized()
    unwritten = _dataset_run(jobs, app, ["a.jpg"], sent=[])  # the last wake was lost
    unwritten.finish(slot_id("a.jpg", 0), "cancelled", {"photo": "a.jpg", "variant": 0})
    for state in (lost, wound_up, unwritten):
        jobs.cancel(state.job_id)
        jobs.redis.hset(f"procrop:job:{state.job_id}", "updated", time.time() - 300)

    assert sorted(recover(jobs, app, after_s=120)) == sorted([lost.job_id, unwritten.job_id])
    assert jobs.get(lost.job_id).status == "cancelled"  # a pass does not revive it
    # Its record does not move: the pass is asked for again until one has run.
    unwritten.mark_finalized()
    assert recover(jobs, app, after_s=120) == [lost.job_id]
