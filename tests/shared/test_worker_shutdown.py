"""A worker told to stop with SIGTERM (what Kubernetes sends a pod the autoscaler removes) shuts
down warm: it finishes its running task, takes no new one, returns nothing lost, and exits 0;
its task keeps its lease meanwhile, so no other worker runs it twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from procrop.servers import ServerProcess
from shared.queue import create_app
from shared.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
WORKER = """
import os, time
import redis
from shared.queue import worker_app
from shared.worker import run_worker

runs = redis.Redis.from_url(os.environ["PROCROP_QUEUE__REDIS_URL"])

@worker_app().task(name="procrop.crop.test_slow")
def slow(token, seconds=3):
    runs.rpush("test:started", token)
    time.sleep(seconds)
    runs.rpush("test:done", token)

run_worker("crop")
"""

pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py


def _start(script: Path, logs: Path) -> subprocess.Popen[bytes]:
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with logs.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(script)], cwd=REPO, stdout=out, stderr=out,
            env={**os.environ, "PYTHONPATH": pythonpath}, start_new_session=True,
        )  # fmt: skip


def _wait_for(broker: redis.Redis, key: str, logs: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not broker.lrange(key, 0, -1):
        assert time.monotonic() < deadline, logs.read_text()[-3000:]
        time.sleep(0.05)


def test_sigterm_finishes_the_running_task_and_leaves_the_rest_queued(
    redis_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/6"
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", url)
    broker = redis.Redis.from_url(url, decode_responses=True)
    app = create_app(load_settings())
    for token in ("t1", "t2", "t3"):
        app.send_task("procrop.crop.test_slow", args=[token])
    script, logs = tmp_path / "worker.py", tmp_path / "worker.log"
    script.write_text(WORKER)
    worker = _start(script, logs)
    try:
        _wait_for(broker, "test:started", logs)
        worker.send_signal(signal.SIGTERM)  # to the parent only, as the kubelet does to PID 1
        assert worker.wait(timeout=30) == 0, logs.read_text()[-3000:]
        assert broker.lrange("test:started", 0, -1) == broker.lrange("test:done", 0, -1) == ["t1"]
        # The two tasks it never started wait in the list the autoscaler watches; none is
        # held unacknowledged (it would come back only after the visibility timeout).
        assert broker.llen("crop") == 2 and broker.hlen("unacked") == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        broker.flushdb()
        broker.close()


def test_a_task_outliving_its_lease_during_warm_shutdown_runs_once(
    redis_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The visibility timeout is a lease (shared/leases.py): a worker in warm shutdown still
    renews it, so a second worker, which returns expired leases to the queue, never gets the
    task that the first one is finishing, however long it runs past the lease."""
    url = f"redis://127.0.0.1:{redis_server.port}/6"
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", url)
    monkeypatch.setenv("PROCROP_QUEUE__VISIBILITY_TIMEOUT_S", "5")
    broker = redis.Redis.from_url(url, decode_responses=True)
    create_app(load_settings()).send_task("procrop.crop.test_slow", args=["t1", 12])
    script, logs = tmp_path / "worker.py", tmp_path / "worker.log"
    script.write_text(WORKER)
    first = _start(script, logs)
    second: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(broker, "test:started", logs)
        first.send_signal(signal.SIGTERM)
        second = _start(script, logs)  # would restore and run t1 if its lease lapsed
        assert first.wait(timeout=60) == 0, logs.read_text()[-3000:]
        time.sleep(2)
        assert broker.lrange("test:started", 0, -1) == broker.lrange("test:done", 0, -1) == ["t1"]
        assert broker.llen("crop") == 0 and broker.hlen("unacked") == 0
    finally:
        for worker in (first, second):
            if worker is not None and worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        broker.flushdb()
        broker.close()
