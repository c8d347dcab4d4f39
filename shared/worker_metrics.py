"""Prometheus metrics of a worker: tasks by queue and outcome, task and stage durations, deliveries.

A Celery worker with the prefork pool is several processes: the parent takes messages from Redis
(deliveries are counted there, on `task_received`) and the pool processes run the tasks (outcomes
and durations are counted there). prometheus-client's multiprocess mode joins them: every process
writes its samples to memory-mapped files in one folder (`PROMETHEUS_MULTIPROC_DIR`), and the
parent serves their sum over HTTP (`MultiProcessCollector`). Counters of a pool process that was
replaced stay in its files, so totals never go back. The same code serves the solo pool (one
process). Only counters and histograms are used: gauges would need live-process bookkeeping.

`serve(host, port)` is called once, in the worker's parent, before the pool starts
(`shared.worker.run_worker`, with `PROCROP_QUEUE__METRICS_PORT` set); without it nothing is
recorded.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Task
from celery.signals import task_postrun, task_prerun, task_received
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Task and stage durations: a retrieval takes milliseconds, one out-paint minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Celery's end state of a task -> its outcome label (`mark_outcome` refines IGNORED).
_OUTCOMES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}
_OUTCOME_ATTR = "procrop_outcome"

_enabled = False


class _Metrics:
    """The worker's metric families; built once per process, after multiprocess mode is on."""

    def __init__(self) -> None:
        # registry=None: in multiprocess mode samples go to files, the collector reads them.
        self.deliveries = Counter(
            "procrop_worker_deliveries", "Task messages this worker took from its queue",
            ["queue", "redelivered"], registry=None,
        )  # fmt: skip
        self.tasks = Counter(
            "procrop_worker_tasks", "Tasks run, by outcome: succeeded, retried, cancelled, "
            "bad_input, timed_out, error, gave_up (retries spent), failed, ignored",
            ["queue", "task", "outcome"], registry=None,
        )  # fmt: skip
        self.task_seconds = Histogram(
            "procrop_worker_task_seconds", "Time a task ran", ["queue", "task"],
            buckets=DURATION_BUCKETS, registry=None,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "procrop_worker_stage_seconds", "Time a job stage's work took (successful stages)",
            ["queue", "stage"], buckets=DURATION_BUCKETS, registry=None,
        )  # fmt: skip


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


def serve(host: str, port: int) -> Path:
    """Turn on multiprocess metrics, serve them on `host:port` from this (the parent) process,
    and connect the Celery signals that record them. Returns the samples folder.

    Call before the pool forks: pool processes inherit the folder (environment) and the signals.
    """
    global _enabled
    folder = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="procrop-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # a restarted container keeps its emptyDir
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    # prometheus-client picks its value class when first imported; if that happened before the
    # variable was set, pick again so that the metrics built below write to the folder.
    values.ValueClass = values.get_value_class()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    start_http_server(port, addr=host, registry=registry)
    task_received.connect(_on_received, weak=False)
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)
    _enabled = True
    log.info("worker metrics on http://%s:%d/metrics (samples in %s)", host, port, folder)
    return folder


def observe_stage(queue: str, stage: str, seconds: float) -> None:
    """Record the duration of one successful job stage (`shared.worker.run_stage`)."""
    if _enabled:
        _metrics().stage_seconds.labels(queue, stage).observe(seconds)


def mark_outcome(task: Task, outcome: str) -> None:
    """Name the outcome of a task that ends in Celery's `Ignore` (a failed or cancelled job
    stage), which Celery itself only reports as IGNORED."""
    setattr(task.request, _OUTCOME_ATTR, outcome)


def _queue_of(task: Task) -> str:
    info = getattr(task.request, "delivery_info", None) or {}
    return str(info.get("routing_key") or "unknown")


def _on_received(request: Any = None, **_: Any) -> None:
    info = getattr(request, "delivery_info", None) or {}
    redelivered = "true" if info.get("redelivered") else "false"
    _metrics().deliveries.labels(str(info.get("routing_key") or "unknown"), redelivered).inc()


def _on_prerun(task: Task | None = None, **_: Any) -> None:
    if task is not None:
        task.request.procrop_started = time.perf_counter()


def _on_postrun(task: Task | None = None, state: str | None = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    outcome = getattr(request, _OUTCOME_ATTR, None) or _OUTCOMES.get(state or "", "ignored")
    queue, metrics = _queue_of(task), _metrics()
    metrics.tasks.labels(queue, task.name, outcome).inc()
    started = getattr(request, "procrop_started", None)
    if started is not None:
        metrics.task_seconds.labels(queue, task.name).observe(time.perf_counter() - started)
