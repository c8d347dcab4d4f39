"""Liveness and readiness (`services/gateway/routes/health.py`): /healthz and /readyz."""

from __future__ import annotations

import socket
import time

import pytest
from fastapi.testclient import TestClient

from procrop.servers import free_port
from services.gateway.app import create_app
from shared.settings import load_settings


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.json()["status"]) == (200, "ok")


def test_readyz_checks_every_dependency(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ok",
        "checks": {"redis": "ok", "s3": "ok", "milvus": "ok"},
    }


def test_readyz_names_an_unreachable_milvus(gateway_env: pytest.MonkeyPatch) -> None:
    gateway_env.setenv("PROCROP_MILVUS__URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with TestClient(create_app(load_settings())) as client:
        response = client.get("/readyz")
    assert time.monotonic() - started < 15
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"] == "ok" and body["checks"]["s3"] == "ok"
    assert body["checks"]["milvus"].startswith("cannot open Milvus at http://127.0.0.1:")


def test_readyz_gives_up_on_a_milvus_that_never_answers(gateway_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:  # accepts connections, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        gateway_env.setenv("PROCROP_MILVUS__URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with TestClient(create_app(load_settings())) as client:
            response = client.get("/readyz")
        took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["checks"]["milvus"] == "no answer in 5 s"
    assert took < 15
