"""The app (`services/gateway/app.py`): it needs API keys to start, answers 503 when a
dependency is down, documents every route and never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from procrop.servers import free_port
from services.gateway.app import create_app
from shared.errors import SettingsError
from shared.settings import load_settings

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("keys", [None, "", " , "])
def test_no_api_keys_refuses_to_start(gateway_env: pytest.MonkeyPatch, keys: str | None) -> None:
    if keys is None:
        gateway_env.delenv("PROCROP_API_KEYS")
    else:
        gateway_env.setenv("PROCROP_API_KEYS", keys)
    with pytest.raises(SettingsError, match="PROCROP_API_KEYS"):
        create_app(load_settings())


def test_redis_down_is_a_503_naming_it(
    gateway_env: pytest.MonkeyPatch, photo: bytes, alice: dict[str, str]
) -> None:
    gateway_env.setenv("PROCROP_QUEUE__REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(load_settings())) as client:
        response = client.post("/v1/crops", headers=alice, files={"image": ("a.jpg", photo)})
        ready = client.get("/readyz")
    assert response.status_code == 503, response.text
    assert response.json()["detail"].startswith("service unavailable: ")
    assert "127.0.0.1" in response.json()["detail"]
    assert ready.status_code == 503 and ready.json()["checks"]["redis"] != "ok"


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) >= {
        "/v1/crops", "/v1/crops/{job_id}", "/v1/collections/{name}/index",
        "/v1/jobs/{job_id}", "/healthz", "/readyz", "/metrics",
    }  # fmt: skip
    assert set(paths["/v1/crops/{job_id}"]) >= {"get", "delete"}
    submit = paths["/v1/crops"]["post"]
    assert set(submit["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert set(submit["responses"]) >= {"202", "401", "413", "415", "422"}
    assert "409" in paths["/v1/crops/{job_id}"]["delete"]["responses"]


def test_gateway_never_imports_torch() -> None:
    code = (
        "import sys, services.gateway.app; "
        "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_options_and_405_name_every_method_of_a_path(
    client: TestClient, alice: dict[str, str]
) -> None:
    """GET and DELETE /v1/crops/{id} are two routes; OPTIONS and a 405 name both."""
    response = client.options("/v1/crops/0123", headers=alice)
    assert response.status_code == 204
    assert response.headers["allow"] == "DELETE, GET, OPTIONS"
    assert client.options("/v1/crops").headers["allow"] == "OPTIONS, POST"
    refused = client.put("/v1/crops/0123", headers=alice)
    assert refused.status_code == 405 and refused.headers["allow"] == "DELETE, GET, OPTIONS"
    assert client.options("/no/such/path").status_code == 404


def test_openapi_states_the_limits(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    [name] = paths["/v1/collections/{name}/index"]["post"]["parameters"]
    assert name["schema"]["pattern"] == "^[A-Za-z][A-Za-z0-9_]{0,199}$"
    bodies = paths["/v1/crops"]["post"]["requestBody"]["content"]
    image_key = bodies["application/json"]["schema"]["properties"]["image_key"]
    assert image_key["pattern"].startswith("^uploads/") and image_key["maxLength"] == 77
    form = bodies["multipart/form-data"]["schema"]
    ratios = form["properties"]["aspect_ratios"]
    assert ratios["maxItems"] == 16 and ratios["items"]["maxLength"] == 16 * 33
    assert form["properties"]["n"]["maximum"] == 100
    assert schemas["IndexRequest"]["properties"]["source"]["maxLength"] == 1024
    for path, operations in paths.items():
        assert "204" in operations["options"]["responses"], path
        for method, operation in operations.items():
            if path.startswith("/v1/") and method != "options":
                assert "503" in operation["responses"], (method, path)
                assert "401" in operation["responses"], (method, path)
