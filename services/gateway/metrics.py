"""Prometheus metrics of the gateway: requests by route and status, latency, jobs, queue depths.

Queue depths (messages waiting per Celery queue) are read from Redis at scrape time, so an
autoscaler (KEDA, HPA on external metrics) can size each worker pool by its own queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "procrop_http_requests", "HTTP requests answered", ["method", "route", "status"],
    registry=REGISTRY,
)  # fmt: skip
LATENCY = Histogram(
    "procrop_http_request_seconds", "Time to answer an HTTP request", ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)  # fmt: skip
JOBS = Counter("procrop_jobs_submitted", "Jobs submitted", ["kind"], registry=REGISTRY)


class _QueueDepths(Collector):
    def __init__(self) -> None:
        self.read: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "procrop_queue_depth", "Messages waiting in a Celery queue", labels=["queue"]
        )
        if self.read is not None:
            for queue, depth in self.read().items():
                family.add_metric([queue], depth)
        yield family


_DEPTHS = _QueueDepths()
REGISTRY.register(_DEPTHS)


def render_metrics(queue_depths: Callable[[], dict[str, int]]) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    _DEPTHS.read = queue_depths
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RequestMetrics:
    """ASGI middleware counting and timing requests by route template (not raw path: job ids
    would make a label per job)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, code = time.perf_counter(), 500

        async def recorded(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            REQUESTS.labels(method, route, str(code)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - started)
