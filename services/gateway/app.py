"""The ProCrop gateway: a FastAPI app over the job queue. It never imports torch.

    procrop gateway                                   # uvicorn on PROCROP_GATEWAY__HOST:PORT

A crop request, file by file: `routes/crops.py` (checks, stores the photo, records the job, sends
the chain) -> `services/embedder/worker.py` -> `services/retriever/worker.py` ->
`services/cropper/worker.py` (the model; result to the object store) -> `routes/crops.py` (GET).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import Clients
from services.gateway.metrics import RequestMetrics
from services.gateway.routes import collections, crops, health, jobs
from services.gateway.schemas import first_error
from services.gateway.uploads import BodyLimit
from shared.errors import SettingsError, StorageError, VectorIndexError, one_line
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)
THREADS = 100  # blocking calls (Redis, S3, Celery) in flight at once


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway for `settings` (default: from the environment); refuses to start without keys."""
    settings = settings or get_settings()
    if not settings.api_key_list:
        raise SettingsError("PROCROP_API_KEYS: set at least one API key (comma-separated)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        app.state.clients = await run_in_threadpool(Clients.connect, settings)
        yield
        await app.state.clients.close()

    app = FastAPI(
        title="ProCrop gateway",
        version="0.1.0",
        summary="Aesthetic crops guided by professional compositions, as jobs over a queue.",
        lifespan=lifespan,
    )
    for module in (crops, collections, jobs, health):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=settings.gateway.max_upload_bytes)
    app.add_middleware(RequestMetrics)
    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": first_error(exc.errors())}, 422)

    @app.exception_handler(StorageError)
    @app.exception_handler(VectorIndexError)
    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        """S3, Milvus or Redis (job records, the broker) failing: 503, with what failed."""
        reason = one_line(exc)
        log.warning("dependency failed: %s", reason)
        return JSONResponse({"detail": f"service unavailable: {reason}"}, 503)


def main() -> None:
    """Serve the gateway with uvicorn (one process; scale with replicas)."""
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.gateway.host, port=settings.gateway.port,
        log_level=settings.log_level.lower(), access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
