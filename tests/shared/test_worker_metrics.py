"""A worker's own Prometheus metrics, scraped from a real `run_worker` (prefork pool, two pool
processes) on a real Redis: deliveries counted in the parent, task outcomes and stage durations
in the pool processes, served as one sum by the parent (prometheus-client multiprocess mode)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from procrop.servers import ServerProcess
from shared.jobs import JobStore
from shared.queue import create_app
from shared.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
WORKER = """
import os
import redis
from shared.errors import InvalidImageError, StorageError
from shared.queue import worker_app
from shared.worker import run_stage, run_worker

runs = redis.Redis.from_url(os.environ["PROCROP_QUEUE__REDIS_URL"])

@worker_app().task(name="procrop.embed.test_ok", bind=True)
def ok(task, job_id):
    return run_stage(task, job_id, "embed", lambda: runs.rpush("test:pids", os.getpid()))

@worker_app().task(name="procrop.embed.test_bad", bind=True)
def bad(task, job_id):
    def work():
        raise InvalidImageError("photo.jpg: not a readable JPEG, PNG or WebP image")
    return run_stage(task, job_id, "embed", work)

@worker_app().task(name="procrop.embed.test_flaky", bind=True)
def flaky(task, job_id):
    def work():
        if runs.incr("test:flaky") == 1:
            raise StorageError("S3 at 127.0.0.1:1: connection refused")
    return run_stage(task, job_id, "embed", work)

run_worker("embed")
"""

pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def worker_env(
    redis_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Environment of a worker with metrics on a free loopback port, samples under tmp_path."""
    env = {
        "PROCROP_QUEUE__REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/5",
        "PROCROP_QUEUE__CONCURRENCY": "2",
        "PROCROP_QUEUE__METRICS_PORT": str(_free_port()),
        "PROCROP_QUEUE__RETRY_BACKOFF_MAX_S": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env
    redis.Redis.from_url(env["PROCROP_QUEUE__REDIS_URL"]).flushdb()


def _start(script: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    path = tmp_path / "worker.py"
    path.write_text(script)
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with (tmp_path / "worker.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(path)], cwd=REPO, stdout=out, stderr=out,
            env={**os.environ, "PYTHONPATH": pythonpath}, start_new_session=True,
        )  # fmt: skip


def _until(check: Callable[[], bool], timeout_s: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}; worker log:\n{logs.read_text()[-3000:]}"
        time.sleep(0.1)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics, by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_worker_metrics_sum_the_parent_and_every_pool_process(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    url, port = (
        worker_env["PROCROP_QUEUE__REDIS_URL"],
        int(worker_env["PROCROP_QUEUE__METRICS_PORT"]),
    )
    store, broker = JobStore.from_url(url), redis.Redis.from_url(url, decode_responses=True)
    app, logs = create_app(load_settings()), tmp_path / "worker.log"
    sent = {"test_ok": 6, "test_bad": 2, "test_flaky": 1}
    jobs = {
        task: [store.create("test", "owner", {}).id for _ in range(n)] for task, n in sent.items()
    }
    cancelled = store.create("test", "owner", {}).id
    store.cancel(cancelled)
    worker = _start(WORKER, tmp_path)
    try:
        for task, ids in jobs.items():
            for job_id in ids:
                app.send_task(f"procrop.embed.{task}", args=[job_id])
        app.send_task("procrop.embed.test_ok", args=[cancelled])
        every_job = [job_id for ids in jobs.values() for job_id in ids]
        _until(
            lambda: all(store.get(j).finished or "embed" in store.get(j).timings for j in every_job)
            and broker.hlen("unacked") == 0,
            60, "jobs did not finish", logs,
        )  # fmt: skip
        samples = _scrape(port)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    # 6 + 2 + 1 cancelled + the flaky task twice (its retry is a new message)
    assert value("procrop_worker_deliveries_total", queue="embed", redelivered="false") == 11
    tasks = "procrop_worker_tasks_total"
    assert value(tasks, queue="embed", task="procrop.embed.test_ok", outcome="succeeded") == 6
    assert value(tasks, queue="embed", task="procrop.embed.test_ok", outcome="cancelled") == 1
    assert value(tasks, queue="embed", task="procrop.embed.test_bad", outcome="bad_input") == 2
    assert value(tasks, queue="embed", task="procrop.embed.test_flaky", outcome="retried") == 1
    assert value(tasks, queue="embed", task="procrop.embed.test_flaky", outcome="succeeded") == 1
    assert value("procrop_worker_stage_seconds_count", queue="embed", stage="embed") == 7
    task_runs = sum(
        v for (name, _), v in samples.items() if name == "procrop_worker_task_seconds_count"
    )
    assert task_runs == 11
    # The parent counted deliveries, pool processes ran tasks: samples of several processes.
    writers = {int(f.stem.rsplit("_", 1)[1]) for f in (tmp_path / "metrics").glob("*.db")}
    pool = {int(pid) for pid in broker.lrange("test:pids", 0, -1)}
    assert worker.pid in writers and pool <= writers and worker.pid not in pool


def test_no_metrics_port_no_metrics(
    worker_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metrics are off by default (the local stack runs several workers on one host)."""
    monkeypatch.delenv("PROCROP_QUEUE__METRICS_PORT")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    assert load_settings().queue.metrics_port == 0
    url, port = (
        worker_env["PROCROP_QUEUE__REDIS_URL"],
        int(worker_env["PROCROP_QUEUE__METRICS_PORT"]),
    )
    store = JobStore.from_url(url)
    job_id = store.create("test", "owner", {}).id
    worker = _start(WORKER, tmp_path)
    try:
        create_app(load_settings()).send_task("procrop.embed.test_ok", args=[job_id])
        _until(
            lambda: "embed" in store.get(job_id).timings,
            60,
            "job did not run",
            tmp_path / "worker.log",
        )
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    assert not (tmp_path / "metrics").exists()
