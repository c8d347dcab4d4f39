"""Against real Redis: what each KEDA ScaledObject watches is where the real Celery app puts a
queue's waiting tasks, all of them, whatever their priority.

kombu's Redis transport keeps a queue's messages in a list named as the queue, but splits it by
priority step by default (`embed`, `embed\\x06\\x163`, `embed\\x06\\x166`, `embed\\x06\\x169`);
KEDA's Redis trigger reads one key (LLEN of `listName`). shared/queue.py sets a single priority
step, so every task of a queue is in the one list the trigger reads."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from kombu.transport.redis import Channel

from procrop.servers import ServerProcess
from shared.queue import QUEUES, create_app
from shared.settings import load_settings

N = 7
PRIORITIES = (None, 0, 3, 5, 9, None, 9)  # N tasks a queue: with and without a priority


def watched(docs: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """Queue -> (list name, database) of every ScaledObject of an overlay."""
    found = {}
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            (trigger,) = doc["spec"]["triggers"]
            meta = trigger["metadata"]
            found[doc["spec"]["scaleTargetRef"]["name"]] = (
                meta["listName"],
                int(meta["databaseIndex"]),
            )
    return found


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_watched_list_holds_exactly_the_queued_tasks(
    rendered: dict[str, list[dict[str, Any]]], redis_server: ServerProcess, overlay: str
) -> None:
    targets = watched(rendered[overlay])
    databases = {db for _, db in targets.values()}
    assert len(databases) == 1
    (db,) = databases
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    app = create_app(load_settings(queue={"redis_url": url}))
    broker = redis.Redis.from_url(url)
    try:
        for queue in QUEUES:
            for priority in PRIORITIES:
                app.send_task(f"procrop.{queue}.test", args=["job"], priority=priority)
        lists = {name for name, _ in targets.values()}
        assert lists == set(QUEUES)
        for name in lists:
            assert broker.type(name) == b"list"  # KEDA's trigger: LLEN for a list
            assert broker.llen(name) == N, name
        # Nothing else holds messages: no per-priority lists, only kombu's own bindings.
        others = {key.decode() for key in broker.keys("*")} - lists
        assert all(key.startswith("_kombu.binding") for key in others), others
    finally:
        broker.flushdb()
        broker.close()


def test_kombus_default_priority_steps_would_split_a_queue(redis_server: ServerProcess) -> None:
    """Why shared/queue.py sets one step: by default a prioritised task goes to another list,
    which a trigger on `embed` would not count."""
    url = f"redis://127.0.0.1:{redis_server.port}/7"
    app = create_app(load_settings(queue={"redis_url": url}))
    options = dict(app.conf.broker_transport_options)
    assert options["priority_steps"] == [0]
    options["priority_steps"] = list(Channel.priority_steps)  # kombu's default, [0, 3, 6, 9]
    app.conf.broker_transport_options = options
    broker = redis.Redis.from_url(url)
    try:
        app.send_task("procrop.embed.test", args=["job"])
        app.send_task("procrop.embed.test", args=["job"], priority=5)
        assert broker.llen("embed") == 1
        assert broker.llen("embed\x06\x163") == 1
    finally:
        broker.flushdb()
        broker.close()
