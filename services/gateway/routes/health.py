"""Liveness (/healthz), readiness (/readyz: Redis, S3 and Milvus answer) and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import Clients, ClientsDep
from services.gateway.metrics import render_metrics
from services.gateway.schemas import Error, Health
from shared.errors import one_line

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 5.0


@router.get("/healthz", response_model=Health, summary="Alive")
async def healthz() -> Health:
    """The process answers (no dependency is checked)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "A dependency does not answer."}},
    summary="Ready",
)
async def readyz(clients: ClientsDep) -> JSONResponse:
    """Redis, the object store and Milvus all answer; 503 naming the ones that do not."""
    checks = dict(
        zip(
            ("redis", "s3", "milvus"),
            await asyncio.gather(
                _check(lambda: clients.jobs.redis.ping()),
                _check(clients.store.check),
                _check(lambda: clients.vector_index().list_collections()),
            ),
            strict=True,
        )
    )
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), 200 if ok else 503)


async def _check(probe: Callable[[], Any]) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(probe), CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"no answer in {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:
        return one_line(exc)
    return "ok"


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        503: {"model": Error, "description": "Redis (queue depths) does not answer."},
    },
    summary="Prometheus metrics",
)
async def metrics(clients: ClientsDep) -> Response:
    """Requests by route and status, their latency, jobs submitted, and queue depths."""
    body, content_type = await run_in_threadpool(render_metrics, _queue_depths(clients))
    return Response(body, media_type=content_type)


def _queue_depths(clients: Clients) -> Callable[[], dict[str, int]]:
    from shared.queue import QUEUES

    def depths() -> dict[str, int]:
        with clients.jobs.redis.pipeline() as pipe:
            for name in QUEUES:
                pipe.llen(name)
            return dict(zip(QUEUES, pipe.execute(), strict=True))

    return depths
