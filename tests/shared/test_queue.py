"""The shared Celery app: routing by task name, delivery guarantees, and the settings behind them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from procrop.servers import ServerProcess
from shared.errors import SettingsError
from shared.queue import (
    CROP,
    EMBED,
    INDEX_BATCH,
    INDEX_PLAN,
    QUEUES,
    RETRIEVE,
    create_app,
    queue_of,
)
from shared.settings import MIN_API_KEY_LENGTH, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
TASKS = {
    EMBED: "embed",
    RETRIEVE: "retrieve",
    CROP: "crop",
    INDEX_PLAN: "index",
    INDEX_BATCH: "index",
}


pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py


@pytest.fixture
def queue_settings() -> Settings:
    return load_settings(
        queue={"time_limit_s": 120, "soft_time_limit_s": 100, "visibility_timeout_s": 300}
    )


@pytest.fixture
def app(queue_settings: Settings) -> Celery:
    return create_app(queue_settings)


@pytest.mark.parametrize(("task", "queue"), TASKS.items())
def test_queue_of_every_task(task: str, queue: str) -> None:
    assert queue_of(task) == queue
    assert queue in QUEUES


@pytest.mark.parametrize(
    "name",
    ["", "procrop", "procrop.embed", "celery.embed.features", "procrop.nope.x", "embed.features"],
)
def test_queue_of_malformed_names_raises(name: str) -> None:
    with pytest.raises(ValueError, match=r"procrop\.<queue>\.<what>"):
        queue_of(name)


def test_messages_are_json_only(app: Celery) -> None:
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]


def test_delivery_options_come_from_the_settings(app: Celery, queue_settings: Settings) -> None:
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.task_ignore_result is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_time_limit == queue_settings.queue.time_limit_s == 120
    assert app.conf.task_soft_time_limit == 100


# A real worker, as `procrop worker embed` runs one (`shared.worker.run_worker`: prefork pool,
# one process), with a task that logs its runs to Redis and hangs on its first run only.
WORKER = """
import os, time
import redis
from shared.queue import worker_app
from shared.worker import run_worker

runs = redis.Redis.from_url(os.environ["PROCROP_QUEUE__REDIS_URL"])

@worker_app().task(name=SLOW_TASK)
def slow(token):
    first = runs.incr("test:runs") == 1
    runs.rpush("test:started", os.getpid())
    time.sleep(float(os.environ.get("TEST_FIRST_RUN_S", "600")) if first else 0)
    runs.rpush("test:done", os.getpid())

run_worker("embed")
"""
SLOW_TASK = "procrop.embed.test_slow"
FAST_LIMITS = {"PROCROP_QUEUE__SOFT_TIME_LIMIT_S": "4", "PROCROP_QUEUE__TIME_LIMIT_S": "5",
               "PROCROP_QUEUE__VISIBILITY_TIMEOUT_S": "6"}  # fmt: skip


def _wait_for(read: Callable[[], list[str]], timeout_s: float, what: str, logs: Path) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while not (got := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got, f"no {what} in {timeout_s:g} s; worker logs:\n{logs.read_text()[-3000:]}"
    return got


@pytest.mark.parametrize("killed", ["pool process", "whole worker"])
def test_delivery_survives_a_dead_worker(
    redis_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed: str
) -> None:
    """A task whose pool process is SIGKILLed is re-queued at once by the worker
    (`reject_on_worker_lost`); a task killed with its whole worker was never acknowledged
    (`acks_late`): after the visibility timeout it goes back to its queue. Either way another
    process runs it again, to the end."""
    url = f"redis://127.0.0.1:{redis_server.port}/4"
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", url)
    for name, value in FAST_LIMITS.items():
        monkeypatch.setenv(name, value)
    script = tmp_path / "worker.py"
    script.write_text(f"SLOW_TASK = {SLOW_TASK!r}\n{WORKER}")
    logs = tmp_path / "workers.log"
    broker = redis.Redis.from_url(url, decode_responses=True)
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker() -> subprocess.Popen[bytes]:
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout's code
        with logs.open("ab") as out:
            worker = subprocess.Popen(
                [sys.executable, str(script)], cwd=REPO, stdout=out, stderr=out,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(path)}, start_new_session=True,
            )  # fmt: skip
        workers.append(worker)
        return worker

    try:
        create_app(load_settings()).send_task(SLOW_TASK, args=["t1"])
        first = start_worker()
        (pid,) = _wait_for(lambda: broker.lrange("test:started", 0, -1), 30, "task run", logs)
        assert broker.llen("embed") == 0 and broker.hlen("unacked") == 1  # delivered, not acked
        if killed == "pool process":
            os.kill(int(pid), signal.SIGKILL)
        else:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            start_worker()
        (done,) = _wait_for(lambda: broker.lrange("test:done", 0, -1), 30, "finished run", logs)
        assert broker.lrange("test:started", 0, -1) == [pid, done] and done != pid
        assert _acked_soon(broker)
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        broker.flushdb()
        broker.close()


class Workers:
    """Real workers (`WORKER` above, each in its own process group) on the broker `url`."""

    def __init__(self, url: str, tmp_path: Path, env: dict[str, str]) -> None:
        self.script, self.logs = tmp_path / "worker.py", tmp_path / "workers.log"
        self.script.write_text(f"SLOW_TASK = {SLOW_TASK!r}\n{WORKER}")
        path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout's code
        self.env = {**os.environ, **env, "PROCROP_QUEUE__REDIS_URL": url,
                    "PYTHONPATH": os.pathsep.join(path)}  # fmt: skip
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        with self.logs.open("ab") as out:
            worker = subprocess.Popen(
                [sys.executable, str(self.script)], cwd=REPO, stdout=out, stderr=out,
                env=self.env, start_new_session=True,
            )  # fmt: skip
        self.procs.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.procs:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)


@pytest.fixture
def broker(redis_server: ServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, db=5, decode_responses=True)
    yield client
    client.flushdb()
    client.close()


def _url(broker: redis.Redis) -> str:
    kwargs = broker.connection_pool.connection_kwargs
    return f"redis://127.0.0.1:{kwargs['port']}/{kwargs['db']}"


def _send_slow(url: str) -> None:
    create_app(load_settings(queue={"redis_url": url})).send_task(SLOW_TASK, args=["t1"])


def test_a_live_worker_keeps_a_task_that_outlasts_its_lease(
    broker: redis.Redis, tmp_path: Path
) -> None:
    """A task three times as long as the lease (6 s) runs once, with a second worker idle
    beside it: its worker renews the lease, so nobody takes the message back."""
    lease = {"PROCROP_QUEUE__VISIBILITY_TIMEOUT_S": "6", "TEST_FIRST_RUN_S": "18"}
    workers = Workers(_url(broker), tmp_path, lease)
    try:
        _send_slow(_url(broker))
        workers.start()
        _wait_for(lambda: broker.lrange("test:started", 0, -1), 30, "task run", workers.logs)
        workers.start()  # idle, consuming the same queue, restoring expired leases
        _wait_for(lambda: broker.lrange("test:done", 0, -1), 40, "finished run", workers.logs)
        time.sleep(2)  # a duplicate would have started by now
        assert broker.llen("test:started") == 1 and broker.llen("test:done") == 1
        assert _acked_soon(broker)
    finally:
        workers.stop()


@pytest.mark.parametrize("restore_lock", ["free", "left held"])
def test_a_dead_workers_task_returns_within_a_minute(
    broker: redis.Redis, tmp_path: Path, restore_lock: str
) -> None:
    """Default settings: the whole worker (process group) SIGKILLed mid-task; the other worker
    runs the task to the end within 60 s (the lease, not the old one-hour timeout). Also when
    kombu's restore lock was left held, as by a process killed while it restored (or a Redis
    killed between its SET and DEL, seen in the e2e suite: the append-only file kept the lock,
    and no dead worker's task came back for kombu's default five minutes)."""
    workers = Workers(_url(broker), tmp_path, {})
    try:
        _send_slow(_url(broker))
        first = workers.start()
        _wait_for(lambda: broker.lrange("test:started", 0, -1), 30, "task run", workers.logs)
        workers.start()
        time.sleep(3)  # the second worker is up, idle
        if restore_lock == "left held":
            app = create_app(load_settings(queue={"redis_url": _url(broker)}))
            with app.connection_for_write() as connection:  # the expiry kombu's Mutex sets
                expire_s = connection.default_channel.unacked_mutex_expire
            broker.set("unacked_mutex", "a process that died restoring", ex=expire_s)
        os.killpg(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait_for(lambda: broker.lrange("test:done", 0, -1), 60, "redelivered run", workers.logs)
        assert time.monotonic() - killed < 60
        assert broker.llen("test:started") == 2 and _acked_soon(broker)
    finally:
        workers.stop()


def _acked_soon(broker: redis.Redis, timeout_s: float = 5) -> bool:
    """The finished run is acknowledged (just after its task returned)."""
    deadline = time.monotonic() + timeout_s
    while broker.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    return broker.hlen("unacked") == 0


def test_the_lease_is_short_and_dead_workers_are_looked_for_often(app: Celery) -> None:
    """The visibility timeout is a lease renewed by live workers (shared/leases.py), so it can
    be far shorter than the slowest task; kombu looks for expired leases every few seconds."""
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 300 < 60 * 60
    assert options["unacked_restore_interval"] == 50 and options["unacked_restore_throttle"] == 1
    default = create_app(load_settings()).conf.broker_transport_options
    assert default["visibility_timeout"] + default["unacked_restore_interval"] <= 40


def test_workers_never_give_up_on_the_broker(app: Celery) -> None:
    assert app.conf.broker_connection_retry is True
    assert app.conf.broker_connection_max_retries is None  # Celery's default gives up after 100
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is True
    policy = app.conf.task_publish_retry_policy  # a chain's next stage waits out ~a minute
    assert policy["max_retries"] * policy["interval_max"] >= 60


def test_broker_is_the_configured_redis(redis_server: ServerProcess) -> None:
    """Tasks sent by the app land in the Redis list of their queue, in the URL's database."""
    url = f"redis://127.0.0.1:{redis_server.port}/3"  # not db 0: the URL's database counts
    app = create_app(load_settings(queue={"redis_url": url}))
    assert app.conf.broker_url == url
    broker = redis.Redis.from_url(url, decode_responses=True)
    db0 = redis.Redis(port=redis_server.port, db=0)
    try:
        sent = {task: app.send_task(task, args=[{"job_id": f"job-{task}"}]).id for task in TASKS}
        depths = {queue: broker.llen(queue) for queue in QUEUES}
        assert depths == {"embed": 1, "retrieve": 1, "crop": 1, "outpaint": 0, "index": 2}
        for queue in ("embed", "retrieve", "crop", "index"):
            for raw in broker.lrange(queue, 0, -1):
                message = json.loads(raw)
                task = message["headers"]["task"]
                assert TASKS[task] == queue and message["headers"]["id"] == sent[task]
                args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                assert args == [{"job_id": f"job-{task}"}]
        assert not any(db0.exists(queue) for queue in QUEUES)
    finally:
        broker.flushdb()
        broker.close()
        db0.close()


@pytest.mark.parametrize(("task", "queue"), TASKS.items())
def test_tasks_route_to_their_queue(app: Celery, task: str, queue: str) -> None:
    route = app.amqp.router.route({}, task)
    assert route["queue"].name == queue


def test_other_tasks_go_to_the_default_queue(app: Celery) -> None:
    assert app.amqp.router.route({}, "celery.ping")["queue"].name == app.conf.task_default_queue


def test_every_queue_is_declared(app: Celery) -> None:
    assert set(app.amqp.queues) == set(QUEUES)


def test_limits_out_of_order_are_refused() -> None:
    with pytest.raises(SettingsError, match="PROCROP_QUEUE") as info:
        load_settings(queue={"time_limit_s": 100, "soft_time_limit_s": 200})
    assert "soft_time_limit_s <= time_limit_s" in str(info.value)


def test_tasks_may_outlast_the_lease() -> None:
    queue = load_settings(queue={"time_limit_s": 4000, "soft_time_limit_s": 3900}).queue
    assert queue.visibility_timeout_s == 30 < queue.time_limit_s


def test_limits_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_QUEUE__SOFT_TIME_LIMIT_S", "4000")
    with pytest.raises(SettingsError, match="PROCROP_QUEUE"):
        load_settings()


def test_redis_url_needs_a_redis_scheme() -> None:
    with pytest.raises(SettingsError, match="PROCROP_QUEUE__REDIS_URL"):
        load_settings(queue={"redis_url": "http://127.0.0.1:6379"})


def test_short_api_key_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    short = "tiny-secret-k3y"
    assert len(short) < MIN_API_KEY_LENGTH
    monkeypatch.setenv("PROCROP_API_KEYS", f"a-long-enough-key-0001,{short}")
    with pytest.raises(SettingsError, match="PROCROP_API_KEYS") as info:
        load_settings()
    message = str(info.value)
    assert short not in message and "a-long-enough-key-0001" not in message
    assert "1 of 2" in message


def test_api_key_list_splits_on_commas_and_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_API_KEYS", " alice-key-0123456789 ,bob-key-0123456789,, ")
    settings = load_settings()
    assert settings.api_key_list == ["alice-key-0123456789", "bob-key-0123456789"]
    assert "alice-key" not in repr(settings)  # a secret in reprs and logs


def test_no_api_keys_is_an_empty_list() -> None:
    assert load_settings().api_key_list == []
