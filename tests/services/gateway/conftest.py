"""The gateway in-process over real Redis, a real S3 server and a real Milvus Lite server, with no
workers: jobs stay queued. The tests mirror `services/gateway/` (`routes/` for its routers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from procrop.servers import ServerProcess, start_milvus_lite
from services.gateway.app import create_app
from shared.settings import Settings, load_settings

ALICE_KEY = "alice-key-0123456789"
BOB_KEY = "bob-key-0123456789"


@pytest.fixture(autouse=True)
def _clean(clean_env: None) -> None:
    """Every gateway test starts without the outer PROCROP_* variables (fixtures set their own)."""


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Milvus Lite in server mode on loopback, one for every gateway test (they only list its
    collections, so they can share it)."""
    server = start_milvus_lite(tmp_path_factory.mktemp("milvus"))
    yield server
    server.stop()


@pytest.fixture
def gateway_env(
    s3_settings: Settings,
    redis_url: str,
    milvus_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> pytest.MonkeyPatch:
    """The gateway's environment (storage from `s3_settings`); tests may override variables."""
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", redis_url)
    monkeypatch.setenv("PROCROP_MILVUS__URI", f"http://127.0.0.1:{milvus_server.port}")
    monkeypatch.setenv("PROCROP_API_KEYS", f"{ALICE_KEY},{BOB_KEY}")
    monkeypatch.setenv("PROCROP_GATEWAY__MAX_UPLOAD_MB", "1")
    return monkeypatch


@pytest.fixture
def gateway_settings(gateway_env: pytest.MonkeyPatch) -> Settings:
    return load_settings()


@pytest.fixture
def client(gateway_settings: Settings) -> Iterator[TestClient]:
    """The app with its lifespan running (clients connected), as a context manager."""
    with TestClient(create_app(gateway_settings)) as test_client:
        yield test_client


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the broker's Redis, to look at queues as a worker would."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def photo(photo_dir: Path) -> bytes:
    return (photo_dir / "chelsea.jpg").read_bytes()


@pytest.fixture
def alice() -> dict[str, str]:
    """Headers of the first API key's requests."""
    return {"Authorization": f"Bearer {ALICE_KEY}"}


@pytest.fixture
def bob() -> dict[str, str]:
    """Headers of the second API key's requests."""
    return {"Authorization": f"Bearer {BOB_KEY}"}
