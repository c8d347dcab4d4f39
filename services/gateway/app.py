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
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kombu.exceptions import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.gateway.deps import Clients
from services.gateway.metrics import RequestMetrics
from services.gateway.routes import collections, crops, datasets, health, jobs
from services.gateway.schemas import first_error
from services.gateway.uploads import BodyLimit
from shared.errors import SettingsError, StorageError, VectorIndexError, one_line
from shared.recovery import Recoverer
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)
THREADS = 100  # blocking calls (Redis, S3, Celery) in flight at once
# The settings the gateway reads, checked before it starts (a bad one is a SettingsError).
SETTINGS = ("home", "max_image_pixels", "log_level", "storage", "milvus", "queue", "gateway",
            "api_keys")  # fmt: skip


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway for `settings` (default: from the environment); refuses to start without keys
    or with an invalid setting it reads."""
    settings = (settings or get_settings()).check(*SETTINGS)
    if not settings.api_key_list:
        raise SettingsError("PROCROP_API_KEYS: set at least one API key (comma-separated)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        app.state.clients = clients = await run_in_threadpool(Clients.connect, settings)
        q = settings.queue
        recoverer = (
            Recoverer(clients.jobs, clients.celery, q.recover_after_s, q.recover_every_s).start()
            if q.recover_after_s
            else None
        )
        yield
        if recoverer is not None:
            await run_in_threadpool(recoverer.stop)
        await clients.close()

    app = FastAPI(
        title="ProCrop gateway",
        version="0.1.0",
        summary="Aesthetic crops guided by professional compositions, as jobs over a queue.",
        lifespan=lifespan,
    )
    for module in (crops, collections, datasets, jobs, health):
        app.include_router(module.router)
    _add_options(app)
    app.add_middleware(BodyLimit, limit=settings.gateway.max_upload_bytes)
    app.add_middleware(RequestMetrics)
    _add_error_handlers(app)
    return app


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path`, with OPTIONS (the routes of one path are separate
    routes, and Starlette's 405 names only the first one's methods)."""
    methods = {"OPTIONS"}
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope: dict[str, Any] = {
            "type": "http",
            "path": path,
            "method": method,
            "root_path": "",
            "headers": [],
        }
        if any(route.matches(scope)[0] is Match.FULL for route in app.router.routes):
            methods.add(method)
    return sorted(methods)


def _add_options(app: FastAPI) -> None:
    """OPTIONS on every path, documented for each path of the OpenAPI document. Answered by the
    405 handler of `_add_error_handlers` (no route serves OPTIONS, so every path that exists
    answers it with 405, which becomes 204 with `Allow`; a catch-all route would miss paths
    with a newline in a parameter)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_options(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_options(schema: dict[str, Any]) -> dict[str, Any]:
    for path, operations in schema["paths"].items():
        names = [p["name"] for op in operations.values() for p in op.get("parameters", [])
                 if p["in"] == "path"]  # fmt: skip
        # OPTIONS answers for any value of a path parameter: no pattern or length limit.
        parameters = [{"name": n, "in": "path", "required": True,
                       "schema": {"type": "string", "minLength": 1}}
                      for n in dict.fromkeys(names)]  # fmt: skip
        operations["options"] = {
            "summary": "Allowed methods",
            "operationId": "options_"
            + path.strip("/").replace("/", "_").replace("{", "").replace("}", ""),
            "parameters": parameters,
            "responses": {
                "204": {
                    "description": "The methods this path serves, in `Allow`.",
                    "headers": {"Allow": {"schema": {"type": "string"}, "required": True}},
                }
            },
        }
    return schema


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": first_error(exc.errors())}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # name every method of the path, not the first route's
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
            if request.method == "OPTIONS" and headers["Allow"] != "OPTIONS":
                return Response(status_code=204, headers=headers)
            if headers["Allow"] == "OPTIONS":  # no route serves the path after all
                return JSONResponse({"detail": "Not Found"}, 404)
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)

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

    settings = get_settings().check(*SETTINGS)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.gateway.host, port=settings.gateway.port,
        log_level=settings.log_level.lower(), access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
