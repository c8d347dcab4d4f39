"""The gateway in-process over real Redis, a real S3 server and a real Milvus Lite server, with no
workers: jobs stay queued. The tests mirror `services/gateway/` (`routes/` for its routers)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from procrop.servers import ServerProcess, free_port, start_milvus_lite
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


@contextlib.contextmanager
def running_gateway(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`procrop gateway` as its own process (real uvicorn) with `env`: (base URL, pid)."""
    port = free_port()
    env = {**env, "PROCROP_GATEWAY__PORT": str(port), "PROCROP_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen([sys.executable, "-m", "procrop", "gateway"], env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def gateway_process(gateway_env: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """The gateway of `gateway_env` as its own process: (base URL, pid)."""
    with running_gateway(dict(os.environ)) as gateway:
        yield gateway
