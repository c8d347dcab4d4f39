"""Job records in a real Redis: round trips, final states, delivery counts, progress, TTL, races."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from shared.jobs import DONE_CHANNEL, KEY_PREFIX, JobNotFoundError, JobStore

TTL_S = 600


@pytest.fixture
def store(redis_url: str) -> Iterator[JobStore]:
    jobs = JobStore.from_url(redis_url, ttl_s=TTL_S)
    yield jobs
    jobs.redis.close()


def _queued(store: JobStore) -> str:
    return store.create("crop", "alice", {"image_key": "uploads/a.jpg", "n": 3}).id


def test_create_and_get_round_trip(store: JobStore) -> None:
    params = {"image_key": "uploads/a.jpg", "n": 3, "aspect_ratios": ["16:9", "1:1"]}
    created = store.create("crop", "alice", params)
    got = store.get(created.id)
    assert got == created
    assert (got.kind, got.owner, got.status, got.params) == ("crop", "alice", "queued", params)
    assert not got.finished and got.error is None and got.result_key is None
    assert got.created == got.updated > 0


def test_ids_are_fresh_32_hex_digits(store: JobStore) -> None:
    ids = {_queued(store) for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    "job_id",
    [
        "0" * 32,  # well formed, never created
        "",
        "../etc/passwd",
        "A" * 32,  # ids are lowercase
        "0" * 31,
        "0" * 33,
        "*",
    ],
)
def test_unknown_and_malformed_ids_raise(store: JobStore, job_id: str) -> None:
    _queued(store)  # a job exists: lookups must not find it by pattern
    with pytest.raises(JobNotFoundError, match="no job"):
        store.get(job_id)


def test_start_stage_runs_the_job_and_counts_every_delivery(store: JobStore) -> None:
    job_id = _queued(store)
    assert store.start_stage(job_id, "embed", "host:1")
    job = store.get(job_id)
    assert (job.status, job.worker, job.deliveries) == ("running", "host:1", {"embed": 1})
    assert store.start_stage(job_id, "embed", "host:2")  # a redelivery: still running
    assert store.start_stage(job_id, "retrieve", "host:2")
    job = store.get(job_id)
    assert job.status == "running" and job.worker == "host:2"
    assert job.deliveries == {"embed": 2, "retrieve": 1}
    assert job.updated >= job.created
    assert set(job.started) == {"embed", "retrieve"}
    assert job.created <= job.started["embed"] <= job.started["retrieve"] <= job.updated


def test_finish_stage_records_timings(store: JobStore) -> None:
    job_id = _queued(store)
    store.start_stage(job_id, "embed", "w")
    store.finish_stage(job_id, "embed", 0.1234567891)
    store.finish_stage(job_id, "crop", 2.5)
    assert store.get(job_id).timings == {"embed": pytest.approx(0.123457), "crop": 2.5}


def test_succeed_is_final_and_keeps_its_result(store: JobStore) -> None:
    job_id = _queued(store)
    assert store.succeed(job_id, "results/a.json")
    assert not store.fail(job_id, "late failure")
    assert not store.cancel(job_id)
    assert not store.succeed(job_id, "results/other.json")
    job = store.get(job_id)
    assert (job.status, job.result_key, job.error) == ("succeeded", "results/a.json", None)
    assert job.finished


def test_cancel_is_final(store: JobStore) -> None:
    job_id = _queued(store)
    store.start_stage(job_id, "embed", "w")
    assert store.cancel(job_id)
    assert not store.succeed(job_id, "results/a.json")
    assert not store.start_stage(job_id, "retrieve", "w")  # the rest of the chain is skipped
    job = store.get(job_id)
    assert job.status == "cancelled" and job.result_key is None
    assert job.error == "cancelled by the client"
    assert job.deliveries == {"embed": 1, "retrieve": 1}  # the late delivery is still counted


def test_fail_records_a_bounded_error(store: JobStore) -> None:
    job_id = _queued(store)
    assert store.fail(job_id, "x" * 5000)
    assert not store.succeed(job_id, "results/a.json")
    job = store.get(job_id)
    assert job.status == "failed" and job.error == "x" * 2000


def test_start_stage_on_a_finished_job_returns_false(store: JobStore) -> None:
    for finish in (
        lambda i: store.succeed(i, "r"),
        lambda i: store.fail(i, "e"),
        lambda i: store.cancel(i),
    ):
        job_id = _queued(store)
        finish(job_id)
        status = store.get(job_id).status
        assert not store.start_stage(job_id, "embed", "w")
        assert store.get(job_id).status == status


def test_transitions_of_an_unknown_job_raise(store: JobStore) -> None:
    missing = JobStore.new_id()
    for move in (
        lambda: store.succeed(missing, "r"),
        lambda: store.fail(missing, "e"),
        lambda: store.cancel(missing),
    ):
        with pytest.raises(JobNotFoundError):
            move()
    assert not store.redis.exists(KEY_PREFIX + missing)


def test_start_stage_of_an_unknown_job_leaves_no_record(store: JobStore) -> None:
    missing = JobStore.new_id()
    with pytest.raises(JobNotFoundError):
        store.start_stage(missing, "embed", "w")
    with pytest.raises(JobNotFoundError):
        store.get(missing)


def test_succeed_publishes_on_the_done_channel(store: JobStore, redis_url: str) -> None:
    job_id = _queued(store)
    listener = redis.Redis.from_url(redis_url, decode_responses=True)
    with listener.pubsub() as pubsub:
        pubsub.subscribe(DONE_CHANNEL + job_id)
        subscribed = pubsub.get_message(timeout=5)
        assert subscribed is not None and subscribed["type"] == "subscribe"
        store.succeed(job_id, "results/a.json")
        store.cancel(job_id)  # not a transition: nothing more is published
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        assert (message["channel"], message["data"]) == (DONE_CHANNEL + job_id, "succeeded")
        assert pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3) is None
    listener.close()


def test_mark_part_done_counts_each_part_once(store: JobStore) -> None:
    job_id = store.create("index", "alice", {"collection": "pro"}).id
    store.set_progress(job_id, 10)
    assert store.get(job_id).progress == {"total": 10, "done": 0}
    assert store.mark_part_done(job_id, "0", 4) == (4, 10)
    assert store.mark_part_done(job_id, "0", 4) == (4, 10)  # redelivered: counted once
    assert store.mark_part_done(job_id, "1", 6) == (10, 10)
    assert store.mark_part_done(job_id, "1", 6) == (10, 10)
    assert store.get(job_id).progress == {"total": 10, "done": 10}


def test_mark_part_done_without_progress_has_total_zero(store: JobStore) -> None:
    job_id = store.create("index", "alice", {}).id
    assert store.mark_part_done(job_id, "0", 3) == (3, 0)


def test_records_expire(store: JobStore) -> None:
    job_id = _queued(store)
    key = KEY_PREFIX + job_id
    assert 0 < store.redis.ttl(key) <= TTL_S
    store.start_stage(job_id, "embed", "w")
    store.succeed(job_id, "r")
    assert 0 < store.redis.ttl(key) <= TTL_S
    store.set_progress(job_id, 2)
    store.mark_part_done(job_id, "0", 1)
    assert 0 < store.redis.ttl(key + ":parts") <= TTL_S


def _finishers(store: JobStore, job_id: str) -> list[tuple[str, Callable[[], bool]]]:
    """Eight concurrent attempts to end the job: succeed, fail and cancel, in turn."""
    kinds = ("succeeded", "failed", "cancelled")
    moves: dict[str, Callable[[int], bool]] = {
        "succeeded": lambda i: store.succeed(job_id, f"results/{i}.json"),
        "failed": lambda i: store.fail(job_id, f"error {i}"),
        "cancelled": lambda i: store.cancel(job_id),
    }
    return [(kinds[i % 3], functools.partial(moves[kinds[i % 3]], i)) for i in range(8)]


def _race(finishers: list[tuple[str, Callable[[], bool]]]) -> list[tuple[str, bool]]:
    """Run every finisher at once (one thread each); (kind, moved) per finisher."""
    barrier = threading.Barrier(len(finishers))
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def run(kind: str, finish: Callable[[], bool]) -> None:
        barrier.wait()
        moved = finish()
        with lock:
            results.append((kind, moved))

    threads = [threading.Thread(target=run, args=pair) for pair in finishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


@pytest.mark.parametrize("round_", range(5))
def test_exactly_one_of_racing_finishers_wins(store: JobStore, round_: int) -> None:
    job_id = _queued(store)
    store.start_stage(job_id, "crop", "w")
    results = _race(_finishers(store, job_id))
    winners = [kind for kind, moved in results if moved]
    assert len(results) == 8 and len(winners) == 1
    assert store.get(job_id).status == winners[0]


def _mark_parts_at_once(store: JobStore, job_id: str, parts: int) -> list[tuple[int, int]]:
    """Each of `parts` threads marks its own one-item part done, all at the same moment."""
    barrier = threading.Barrier(parts)
    seen: list[tuple[int, int]] = []

    def run(part: int) -> None:
        barrier.wait()
        seen.append(store.mark_part_done(job_id, str(part), 1))

    threads = [threading.Thread(target=run, args=(p,)) for p in range(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return seen


def test_exactly_one_concurrent_part_sees_the_job_complete(store: JobStore) -> None:
    for _ in range(10):
        job_id = store.create("index", "alice", {}).id
        store.set_progress(job_id, 16)
        seen = _mark_parts_at_once(store, job_id, 16)
        assert sorted(done for done, _ in seen) == list(range(1, 17))  # no part lost or doubled
        assert {total for _, total in seen} == {16}


def test_recorded_progress_is_complete_after_concurrent_parts(store: JobStore) -> None:
    for _ in range(20):
        job_id = store.create("index", "alice", {}).id
        store.set_progress(job_id, 16)
        _mark_parts_at_once(store, job_id, 16)
        assert store.get(job_id).progress == {"total": 16, "done": 16}
