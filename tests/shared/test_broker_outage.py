"""What a worker does when its broker goes away under a running task (a Redis restart), on a
real Redis: the acknowledgement that finds its connection closed does not stop the worker and
leaves the message to come back, and a retry that cannot be sent puts the message back instead
of dropping it (Celery's own `retry` rejects it for good)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection, Queue
from kombu.asynchronous import Hub

from procrop.servers import ServerProcess, free_port, restart_server, start_redis
from shared import worker
from shared.queue import ProCropConsumer, create_app, settle_if_open
from shared.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py


@pytest.fixture
def redis_url(redis_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"redis://127.0.0.1:{redis_server.port}/8"
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", url)
    yield url
    redis.Redis.from_url(url).flushdb()


def _closed_channel_message(app: Celery, redis_url: str) -> tuple[Any, Connection]:
    """A delivered, unacknowledged message whose channel looks as a worker's does after Redis
    went away (seen in a worker's log): closed, its connection None, and its Redis pool dropped
    (kombu drops it when the reconnecting channel's ping fails), so settling it must build a
    client anew."""

    @app.task(name="procrop.index.test_noop")
    def noop() -> None: ...

    noop.delay()
    connection = app.connection_for_read()
    message = Queue("index")(connection.default_channel).get(no_ack=False)
    assert message is not None and redis.Redis.from_url(redis_url).hlen("unacked") == 1
    channel = message.channel
    connection.close()
    channel._disconnect_pools()
    return message, connection


@pytest.mark.parametrize("settle", ["ack_log_error", "reject_log_error"])
def test_settling_a_message_after_the_connection_closed_keeps_the_worker_and_the_message(
    redis_url: str, settle: str
) -> None:
    """The consumer's `call_soon_ack`, through which every acknowledgement and rejection of a
    task message is scheduled on the worker's event loop, as Celery 5.7 wires it: the settle
    that runs later on the closed channel must not raise (the worker would exit: CI saw a retry
    that could not be sent reject its message back to the queue after Redis came back)."""
    message, connection = _closed_channel_message(create_app(load_settings()), redis_url)
    errors = connection.connection_errors
    kwargs = {"requeue": True} if settle == "reject_log_error" else {}
    with pytest.raises(AttributeError):  # kombu's own: what stopped the worker
        getattr(message, settle)(logging.getLogger("test"), errors, **kwargs)

    consumer = object.__new__(ProCropConsumer)  # only its event loop is needed here
    consumer.hub = Hub()
    scheduled = consumer.call_soon_ack(
        getattr(message, settle), logging.getLogger("t"), errors, **kwargs
    )
    scheduled()  # what the event loop does with it
    # Not settled in Redis: back in its queue (restored as its channel closed) or still held
    # for its lease to run out; never gone.
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen("index") + broker.hlen("unacked") == 1


def test_settling_on_an_open_channel_still_raises_real_errors() -> None:
    class Message:
        channel = type("Channel", (), {"connection": object()})()

        def ack_log_error(self) -> None:
            raise AttributeError("a real bug")

    with pytest.raises(AttributeError, match="a real bug"):
        settle_if_open(Message().ack_log_error)()


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = create_app(load_settings())
    runs = redis.Redis.from_url(redis_url)
    dead_broker = Connection(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there

    @app.task(name="procrop.index.test_unsendable_retry", bind=True)
    def unsendable_retry(task: Any, token: str) -> None:
        if runs.rpush("test:runs", token) == 1:  # first delivery: the retry cannot be sent
            worker.retry_later(task, 0, 5, producer=app.amqp.Producer(dead_broker), retry=False)
        runs.rpush("test:done", token)

    with start_worker(app, perform_ping_check=False, queues=["index"]):
        yield app
    dead_broker.release()


def test_a_retry_that_cannot_be_sent_puts_the_message_back(app: Celery, redis_url: str) -> None:
    runs = redis.Redis.from_url(redis_url, decode_responses=True)
    app.send_task("procrop.index.test_unsendable_retry", args=["t1"])
    deadline = time.monotonic() + 30
    while not runs.lrange("test:done", 0, -1) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Celery's retry would have rejected it without requeue: one run, never done.
    assert runs.lrange("test:runs", 0, -1) == ["t1", "t1"]
    assert runs.lrange("test:done", 0, -1) == ["t1"]


SLOW_WORKER = """
import os, time
import redis
from shared.queue import worker_app
from shared.worker import run_worker

runs = redis.Redis.from_url(os.environ["PROCROP_QUEUE__REDIS_URL"])

@worker_app().task(name="procrop.index.test_slow")
def slow(token):
    runs.rpush("test:started", token)
    time.sleep(4)
    runs.rpush("test:done", token)

run_worker("index")
"""


def _wait_until(check: Any, what: str, logs: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}:\n{logs.read_text()[-4000:]}"
        time.sleep(0.1)


def test_a_redis_restart_under_a_running_task_keeps_the_worker_and_runs_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index worker's prefetch (4) keeps a BRPOP waiting while a task runs: the state in
    which Celery 5.7's reconnect closed the broken connection after collecting it, found no
    broker address to restore the running task's message with, and the worker exited (seen in
    CI: `worker-index exited` after the stack's Redis was SIGKILLed)."""
    server = start_redis(tmp_path / "redis")
    url = f"redis://127.0.0.1:{server.port}/0"
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", url)
    monkeypatch.setenv("PROCROP_QUEUE__VISIBILITY_TIMEOUT_S", "6")  # a short lease: back soon
    script, logs = tmp_path / "worker.py", tmp_path / "worker.log"
    script.write_text(SLOW_WORKER)
    with logs.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=REPO, stdout=out, stderr=out,
            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        )  # fmt: skip
    try:
        create_app(load_settings()).send_task("procrop.index.test_slow", args=["t1"])
        broker = redis.Redis.from_url(url, decode_responses=True)
        _wait_until(lambda: broker.lrange("test:started", 0, -1), "never started", logs)
        server.proc.kill()
        server.proc.wait()
        time.sleep(1)
        server = restart_server("redis", list(map(str, server.proc.args)), server.port, logs)
        broker = redis.Redis.from_url(url, decode_responses=True)
        _wait_until(lambda: "t1" in broker.lrange("test:done", 0, -1), "t1 never done", logs, 90)
        # The same worker takes new work after the restart.
        create_app(load_settings()).send_task("procrop.index.test_slow", args=["t2"])
        _wait_until(lambda: "t2" in broker.lrange("test:done", 0, -1), "t2 never done", logs, 90)
        assert proc.poll() is None, logs.read_text()[-4000:]
        assert "Unrecoverable error" not in logs.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
