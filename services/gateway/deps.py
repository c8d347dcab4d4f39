"""The gateway's clients (one set per process) and request dependencies (API key, clients).

Blocking clients (Redis for job records, S3, Celery's producer) are called from the thread pool;
only waiting for a job runs on the event loop (Redis pub/sub, `redis.asyncio`).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis.asyncio as aioredis
from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.jobs import JobStore
from shared.ownership import UploadOwners
from shared.queue import create_app
from shared.settings import Settings
from shared.storage import ObjectStore, build_object_store


@dataclass
class Clients:
    """Everything a request handler talks to."""

    settings: Settings
    jobs: JobStore
    store: ObjectStore
    celery: Celery
    redis_async: aioredis.Redis
    uploads: UploadOwners  # who sent which photo (shared/ownership.py)
    key_digests: list[str] = field(default_factory=list)  # sha256 of each API key
    _index: Any = None
    _index_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, settings: Settings) -> Clients:
        q = settings.queue
        redis_async = aioredis.Redis.from_url(
            q.redis_url, decode_responses=True, socket_connect_timeout=5
        )
        jobs = JobStore.from_url(q.redis_url, q.job_ttl_s)
        return cls(
            settings=settings,
            jobs=jobs,
            uploads=UploadOwners(jobs.redis, q.job_ttl_s),
            store=build_object_store(settings),
            celery=create_app(settings),
            redis_async=redis_async,
            key_digests=[_digest(key) for key in settings.api_key_list],
        )

    def vector_index(self) -> Any:
        """Milvus, opened on first use (readiness checks only; pymilvus is slow to import)."""
        with self._index_lock:
            if self._index is None:
                from shared.vector_index import open_index

                self._index = open_index(self.settings)
            return self._index

    async def close(self) -> None:
        await self.redis_async.aclose()
        self.jobs.redis.close()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_clients(request: Request) -> Clients:
    clients: Clients = request.app.state.clients
    return clients


_bearer = HTTPBearer(auto_error=False, description="An API key from PROCROP_API_KEYS.")


def owner_of(
    clients: Annotated[Clients, Depends(get_clients)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The owner id of the request's API key; 401 without a valid one."""
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer KEY'")
    digest = _digest(credentials.credentials)
    if any(hmac.compare_digest(known, digest) for known in clients.key_digests):
        return digest[:16]  # the owner id: jobs record it, never the key
    raise _unauthorized("invalid API key")


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"}
    )


ClientsDep = Annotated[Clients, Depends(get_clients)]
Owner = Annotated[str, Depends(owner_of)]
