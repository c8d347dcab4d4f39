"""The gateway over real Redis, S3 and Milvus Lite, with no workers: jobs stay queued.

Every answer is checked for its status code and its body (`{"detail": reason}` for errors).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from procrop.servers import free_port
from services.gateway.app import create_app
from shared.errors import SettingsError
from shared.jobs import KEY_PREFIX, JobStore
from shared.queue import CROP, EMBED, INDEX_PLAN, RETRIEVE
from shared.settings import Settings, load_settings
from shared.storage import build_object_store
from shared.storage.keys import job_key

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[3]


class Answer(Protocol):
    """An HTTP response, from the TestClient (httpx2) or from httpx."""

    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def request(self) -> Any: ...
    def json(self) -> Any: ...


def _submit(
    client: TestClient, headers: dict[str, str], data: bytes, name: str = "photo.jpg", **fields: Any
) -> Answer:
    files = {"image": (name, data, "application/octet-stream")}
    form = {k: str(v) for k, v in fields.items()}
    return client.post("/v1/crops", headers=headers, files=files, data=form)


def _accepted(response: Answer) -> str:
    """The job id of a 202 answer (checked: body and Location agree)."""
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and len(body["job_id"]) == 32
    assert response.headers["location"].endswith(body["job_id"])
    return str(body["job_id"])


def _detail(response: Answer, code: int) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def _png(size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


# 1. API keys


@pytest.mark.parametrize("auth", [None, "Bearer not-a-key-0123456789", "Basic YWxpY2U6eA=="])
def test_requests_without_a_valid_key_are_refused(
    client: TestClient, photo: bytes, broker: redis.Redis, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    for response in (
        _submit(client, headers, photo),
        client.get(f"/v1/crops/{'0' * 32}", headers=headers),
        client.post("/v1/collections/pro/index", headers=headers, json={"source": "pro/"}),
    ):
        assert "API key" in _detail(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert broker.llen("embed") == broker.llen("index") == 0
    assert not broker.keys("procrop:job:*")


@pytest.mark.parametrize("keys", [None, "", " , "])
def test_no_api_keys_refuses_to_start(gateway_env: pytest.MonkeyPatch, keys: str | None) -> None:
    if keys is None:
        gateway_env.delenv("PROCROP_API_KEYS")
    else:
        gateway_env.setenv("PROCROP_API_KEYS", keys)
    with pytest.raises(SettingsError, match="PROCROP_API_KEYS"):
        create_app(load_settings())


# 2. Crop jobs from uploads


def test_upload_is_queued_and_stored_once(
    client: TestClient, gateway_settings: Settings, alice: dict[str, str], photo: bytes
) -> None:
    first = _accepted(_submit(client, alice, photo, n=3))
    second = _accepted(_submit(client, alice, photo))
    assert first != second
    got = client.get(f"/v1/crops/{first}", headers=alice)
    assert got.status_code == 200
    body = got.json()
    assert (body["job_id"], body["status"], body["result"], body["error"]) == (
        first, "queued", None, None
    )  # fmt: skip
    store = build_object_store(gateway_settings)
    key = f"uploads/{hashlib.sha256(photo).hexdigest()}.jpg"
    assert list(store.list("uploads/")) == [key]
    assert store.get(key) == photo


def test_jobs_are_private_to_their_key(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], photo: bytes
) -> None:
    job_id = _accepted(_submit(client, alice, photo))
    missing = "f" * 32
    theirs = _detail(client.get(f"/v1/crops/{job_id}", headers=bob), 404)
    nobody = _detail(client.get(f"/v1/crops/{missing}", headers=bob), 404)
    assert theirs.replace(job_id, missing) == nobody  # nothing tells the two apart
    assert _detail(client.get(f"/v1/jobs/{job_id}", headers=bob), 404)


def test_any_job_view_of_a_crop_job(
    client: TestClient, alice: dict[str, str], photo: bytes
) -> None:
    job_id = _accepted(_submit(client, alice, photo))
    got = client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert got.status_code == 200
    body = got.json()
    assert (body["kind"], body["status"]) == ("crop", "queued")
    assert body["progress"] == {"done": 0, "total": 1}
    assert _detail(client.get("/v1/jobs/not-a-job", headers=alice), 404)


def _task_message(raw: str) -> tuple[str, list[Any], dict[str, Any]]:
    """A Celery (protocol 2) message from a Redis queue: task name, args, embed options."""
    message = json.loads(raw)
    args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["task"], args, embed


def test_submit_sends_the_chain_to_the_embed_queue(
    client: TestClient, alice: dict[str, str], photo: bytes, broker: redis.Redis
) -> None:
    job_id = _accepted(_submit(client, alice, photo, n=2, aspect_ratios="16:9, 1:1"))
    depths = {q: broker.llen(q) for q in ("embed", "retrieve", "crop", "outpaint", "index")}
    assert depths == {"embed": 1, "retrieve": 0, "crop": 0, "outpaint": 0, "index": 0}
    task, args, embed = _task_message(str(broker.lindex("embed", 0)))
    assert task == EMBED
    (message,) = args
    assert message["job_id"] == job_id and message["sha256"] == hashlib.sha256(photo).hexdigest()
    assert (message["n"], message["aspect_ratios"]) == (2, ["16:9", "1:1"])
    assert message["image_key"] == f"uploads/{message['sha256']}.jpg"
    rest = [signature["task"] for signature in reversed(embed["chain"])]
    assert rest == [RETRIEVE, CROP]


def test_metrics_show_queue_depth_and_requests(
    client: TestClient, alice: dict[str, str], photo: bytes
) -> None:
    job_id = _accepted(_submit(client, alice, photo))
    client.get(f"/v1/crops/{job_id}", headers=alice)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'procrop_queue_depth{queue="embed"} 1.0' in lines
    assert 'procrop_queue_depth{queue="crop"} 0.0' in lines
    requests = [line for line in lines if line.startswith("procrop_http_requests_total{")]
    assert any('route="/v1/crops"' in line and 'status="202"' in line for line in requests)
    assert any('route="/v1/crops/{job_id}"' in line for line in requests)
    assert job_id not in response.text  # routes by template: no label per job


# 3. Uploads checked by content


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (bytes(range(256)) * 40, "photo.jpg"),  # random-looking bytes
        (b"just some text, not a photo\n" * 20, "notes.jpg"),
        (b"", "empty.jpg"),
    ],
)
def test_uploads_that_are_not_photos_are_refused(
    client: TestClient, alice: dict[str, str], broker: redis.Redis, data: bytes, name: str
) -> None:
    detail = _detail(_submit(client, alice, data, name=name), 415)
    assert "image" in detail  # names the field
    assert broker.llen("embed") == 0


def test_truncated_jpeg_is_refused(client: TestClient, alice: dict[str, str], photo: bytes) -> None:
    assert "image" in _detail(_submit(client, alice, photo[: len(photo) // 2]), 415)


def test_content_decides_not_the_name(
    client: TestClient, gateway_settings: Settings, alice: dict[str, str]
) -> None:
    png = _png()
    job_id = _accepted(_submit(client, alice, png, name="notes.txt"))
    key = f"uploads/{hashlib.sha256(png).hexdigest()}.png"
    assert build_object_store(gateway_settings).exists(key)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "queued"


# 4. Size limit


def _oversized_form(boundary: str, size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A multipart body with a `size`-byte file, in chunks."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    for _ in range(size // chunk):
        yield b"\xff" * chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_oversized_upload_with_content_length(
    client: TestClient, alice: dict[str, str], broker: redis.Redis
) -> None:
    response = _submit(client, alice, b"\xff" * (2 * MiB))
    assert int(response.request.headers["content-length"]) > 2 * MiB
    assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in _detail(response, 413)
    assert broker.llen("embed") == 0


def test_oversized_upload_streamed_without_content_length(
    client: TestClient, alice: dict[str, str], broker: redis.Redis
) -> None:
    boundary = "procrop-test-boundary"
    response = client.post(
        "/v1/crops",
        headers={**alice, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=_oversized_form(boundary, 2 * MiB),
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in _detail(response, 413)
    assert broker.llen("embed") == 0


def test_oversized_stream_is_refused_before_it_is_read_whole(
    client: TestClient, alice: dict[str, str]
) -> None:
    """Chunk by chunk through the ASGI app (TestClient reads a body whole before sending it)."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for part in _oversized_form("b0undary", 8 * MiB):
            sent += len(part)
            yield part

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            headers = {**alice, "Content-Type": "multipart/form-data; boundary=b0undary"}
            return await http.post("/v1/crops", headers=headers, content=body())

    response = client.portal.call(post)  # type: ignore[union-attr]
    assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in _detail(response, 413)
    assert sent < 2 * MiB  # stopped reading just past the 1 MiB limit, not at 8 MiB


def test_oversized_json_is_refused_too(client: TestClient, alice: dict[str, str]) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"source": "'
        for _ in range(32):
            yield b"p" * (64 * 1024)
        yield b'"}'

    for path in ("/v1/crops", "/v1/collections/pro/index"):
        response = client.post(
            path, headers={**alice, "Content-Type": "application/json"}, content=body()
        )
        assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in _detail(response, 413)


def test_upload_just_under_the_limit_is_read(client: TestClient, alice: dict[str, str]) -> None:
    """Not refused by size: decoded, and refused as a photo instead."""
    detail = _detail(_submit(client, alice, b"\xff" * (MiB - 1024)), 415)
    assert "MAX_UPLOAD" not in detail


# 5. Request checks


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": 101}, "n: Input should be less than or equal to 100"),
        ({"n": "many"}, "n: Input should be a valid integer"),
        ({"aspect_ratios": "abc"}, "aspect ratio must be 'W:H'"),
        ({"aspect_ratios": "16:9,0:1"}, "'0:1'"),
        ({"wait": -1}, "wait: Input should be greater than or equal to 0"),
    ],
)
def test_bad_form_fields_are_422_with_the_reason(
    client: TestClient,
    alice: dict[str, str],
    photo: bytes,
    broker: redis.Redis,
    fields: dict[str, Any],
    reason: str,
) -> None:
    assert reason in _detail(_submit(client, alice, photo, **fields), 422)
    assert broker.llen("embed") == 0


def test_missing_image_field_is_422(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops", headers=alice, files={"photo": ("a.jpg", b"x")}, data={"n": "2"}
    )
    assert "'image'" in _detail(response, 422)


def test_plain_text_body_is_415(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops", headers={**alice, "Content-Type": "text/plain"}, content=b"crop it"
    )
    detail = _detail(response, 415)
    assert "text/plain" in detail and "multipart/form-data" in detail


def test_invalid_json_is_400(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops", headers={**alice, "Content-Type": "application/json"}, content=b"{oops"
    )
    assert "invalid JSON" in _detail(response, 400)


def test_json_body_that_is_not_utf8_is_400(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops",
        headers={**alice, "Content-Type": "application/json"},
        content=b'{"image_key": "uploads/\xff.jpg"}',
    )
    assert "invalid JSON" in _detail(response, 400)


# 6. Crop jobs from stored photos (JSON)


def test_json_request_for_an_uploaded_photo(
    client: TestClient, alice: dict[str, str], photo: bytes, broker: redis.Redis
) -> None:
    _accepted(_submit(client, alice, photo))
    key = f"uploads/{hashlib.sha256(photo).hexdigest()}.jpg"
    job_id = _accepted(client.post("/v1/crops", headers=alice, json={"image_key": key, "n": 4}))
    assert broker.llen("embed") == 2
    body = client.get(f"/v1/crops/{job_id}", headers=alice).json()
    assert body["status"] == "queued"


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        ({"image_key": "uploads/nothing-here.jpg"}, 404, "uploads/nothing-here.jpg"),
        ({"image_key": "../x"}, 422, "../x"),
        ({"image_key": "/etc/passwd"}, 422, "/etc/passwd"),
        ({"image_key": "uploads/a.jpg", "n": 0}, 422, "n: Input should be greater than"),
        ({"image_key": "uploads/a.jpg", "aspect_ratios": ["abc"]}, 422, "got 'abc'"),
        ({"n": 3}, 422, "image_key: Field required"),
    ],
)
def test_bad_json_requests(
    client: TestClient,
    alice: dict[str, str],
    broker: redis.Redis,
    payload: dict[str, Any],
    code: int,
    reason: str,
) -> None:
    assert reason in _detail(client.post("/v1/crops", headers=alice, json=payload), code)
    assert broker.llen("embed") == 0


def test_wait_answers_202_after_the_wait_without_workers(
    client: TestClient, alice: dict[str, str], photo: bytes
) -> None:
    started = time.monotonic()
    response = _submit(client, alice, photo, wait=0.5)
    took = time.monotonic() - started
    job_id = _accepted(response)
    assert 0.4 <= took < 5
    assert client.get(f"/v1/crops/{job_id}", headers=alice).json()["status"] == "queued"


def _finish_first_job(redis_url: str, settings: Settings, result: dict[str, Any]) -> None:
    """What the crop worker does last, for the first job that appears: store, then succeed."""
    jobs = JobStore.from_url(redis_url)
    deadline = time.monotonic() + 10
    while not (keys := jobs.redis.keys(KEY_PREFIX + "*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    job_id = str(keys[0]).removeprefix(KEY_PREFIX)
    key = job_key(job_id, "result.json")
    build_object_store(settings).put(key, json.dumps(result).encode(), "application/json")
    time.sleep(0.2)  # the gateway is waiting by now
    jobs.succeed(job_id, key)
    jobs.redis.close()


def test_wait_answers_200_with_the_result_when_the_job_finishes(
    client: TestClient,
    gateway_settings: Settings,
    redis_url: str,
    alice: dict[str, str],
    photo: bytes,
) -> None:
    crops = [{"box": [0, 0, 64, 36], "score": 0.75, "aspect_ratio": "16:9"}]
    result = {"width": 256, "height": 171, "crops": crops}
    worker = threading.Thread(
        target=_finish_first_job, args=(redis_url, gateway_settings, result), daemon=True
    )
    worker.start()
    started = time.monotonic()
    response = _submit(client, alice, photo, wait=20)
    assert time.monotonic() - started < 10  # answered when the job ended, not after 20 s
    worker.join(timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["result"], body["error"]) == ("succeeded", result, None)
    assert client.get(f"/v1/crops/{body['job_id']}", headers=alice).json() == body
    detail = _detail(client.delete(f"/v1/crops/{body['job_id']}", headers=alice), 409)
    assert "succeeded" in detail


# 7. Cancelling


def test_cancel_a_queued_job(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], photo: bytes
) -> None:
    job_id = _accepted(_submit(client, alice, photo))
    assert "no crop job" in _detail(client.delete(f"/v1/crops/{job_id}", headers=bob), 404)
    cancelled = client.delete(f"/v1/crops/{job_id}", headers=alice)
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert (body["job_id"], body["status"]) == (job_id, "cancelled")
    assert body["updated"] >= body["created"]
    assert "cancelled" in _detail(client.delete(f"/v1/crops/{job_id}", headers=alice), 409)
    assert client.get(f"/v1/crops/{job_id}", headers=alice).json()["status"] == "cancelled"


# 8. Indexing jobs


def test_index_job_is_queued(
    client: TestClient,
    gateway_settings: Settings,
    alice: dict[str, str],
    bob: dict[str, str],
    broker: redis.Redis,
) -> None:
    response = client.post("/v1/collections/pro/index", headers=alice, json={"source": "pro/"})
    job_id = _accepted(response)
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert broker.llen("index") == 1 and broker.llen("embed") == 0
    task, args, _ = _task_message(str(broker.lindex("index", 0)))
    assert (task, args) == (INDEX_PLAN, [job_id])
    body = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert (body["kind"], body["status"], body["progress"]) == (
        "index", "queued", {"done": 0, "total": 0}
    )  # fmt: skip
    assert _detail(client.get(f"/v1/jobs/{job_id}", headers=bob), 404)
    assert _detail(client.get(f"/v1/crops/{job_id}", headers=alice), 404)  # not a crop job
    bucket = gateway_settings.storage.bucket
    assert JobStore(broker).get(job_id).params == {
        "collection": "pro", "source": f"s3://{bucket}/pro/", "encoder": None,
        "annotations_key": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("1bad-name", {"source": "pro/"}, "1bad-name"),
        ("pro", {"source": "pro/", "annotations_key": "../a.json"}, "../a.json"),
        ("pro", {}, "source: Field required"),
        ("pro", {"source": "pro/", "encoder": "clip"}, "encoder: Input should be 'lite' or 'sam'"),
    ],
)
def test_bad_index_requests_are_422(
    client: TestClient,
    alice: dict[str, str],
    broker: redis.Redis,
    name: str,
    payload: dict[str, Any],
    reason: str,
) -> None:
    response = client.post(f"/v1/collections/{name}/index", headers=alice, json=payload)
    assert reason in _detail(response, 422)
    assert broker.llen("index") == 0


# 9. Health


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


# 10. OpenAPI document


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


# 11. Imports


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
