"""CAD runs through the gateway on real workers (`procrop worker index|embed|outpaint`, separate
processes) over a real Redis and S3 server: every item once in the manifest, counters equal to
the manifest, labels that `procrop train` reads, redeliveries counted once, resume, cancel."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from procrop.servers import ServerProcess
from services.gateway.app import create_app
from shared.annotations import load_jsonl
from shared.queue import CAD_FILL
from shared.queue import create_app as create_celery
from shared.runs import RunState
from shared.settings import Settings, load_settings
from shared.storage import build_object_store

API_KEY = "dataset-test-key-0123456789"
OTHER_KEY = "dataset-test-key-of-tenant-b"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
VARIANTS = 2


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, redis_server: ServerProcess, s3_server: ServerProcess
) -> Iterator[dict[str, str]]:
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    home = tmp_path_factory.mktemp("cad-home")
    values = {
        "PROCROP_HOME": str(home),
        "PROCROP_QUEUE__REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/5",
        "PROCROP_QUEUE__POOL": "solo",
        "PROCROP_STORAGE__BACKEND": "s3",
        "PROCROP_STORAGE__ENDPOINT": f"127.0.0.1:{s3_server.port}",
        "PROCROP_STORAGE__ACCESS_KEY": S3_ACCESS_KEY,
        "PROCROP_STORAGE__SECRET_KEY": S3_SECRET_KEY,
        "PROCROP_STORAGE__BUCKET": "cad-runs",
        "PROCROP_CAD__MAX_IN_FLIGHT": "4",
        "PROCROP_API_KEYS": f"{API_KEY},{OTHER_KEY}",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


@pytest.fixture(scope="module")
def settings(env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture(scope="module")
def workers(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    logs = tmp_path_factory.mktemp("cad-logs")
    procs = {queue: _start_worker(queue, env, logs) for queue in ("index", "embed", "outpaint")}
    yield procs
    for proc in procs.values():
        _kill_group(proc)


def _start_worker(queue: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    log = open(logs / f"{queue}.log", "ab")  # noqa: SIM115  (the worker writes it)
    return subprocess.Popen(
        [sys.executable, "-m", "procrop.cli", "worker", queue],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def photos(settings: Settings, photo_dir: Path) -> list[str]:
    """Six real photos, one corrupt file and one photo too small, under `pro/` in the bucket."""
    store = build_object_store(settings)
    names = []
    for path in sorted(photo_dir.iterdir()):
        store.put(f"pro/{path.name}", path.read_bytes())
        names.append(path.name)
    store.put("pro/broken.jpg", b"\xff\xd8 not a jpeg")
    tiny = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tiny, "PNG")
    store.put("pro/tiny.png", tiny.getvalue())
    return [*names, "broken.jpg", "tiny.png"]


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _wait_done(client: TestClient, job_id: str, timeout_s: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/datasets/{job_id}", headers=HEADERS).json()
        if (
            body["status"] in ("succeeded", "failed", "cancelled")
            and body["counts"]["in_flight"] == 0
        ):
            return body
        time.sleep(0.5)
    raise AssertionError(f"run {job_id} did not finish: {body}")


def _manifest(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/datasets/{job_id}/manifest", headers=HEADERS)
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines()]


def test_a_run_makes_every_item_once_with_labels_train_reads(
    client: TestClient, workers: Any, photos: list[str], settings: Settings, tmp_path: Path
) -> None:
    answer = client.post(
        "/v1/datasets", headers=HEADERS, json={"source": "pro/", "variants": VARIANTS, "seed": 7}
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    body = _wait_done(client, job_id)
    assert body["status"] == "succeeded", body

    lines = _manifest(client, job_id)
    assert len(lines) == len(photos) * VARIANTS
    assert len({line["slot"] for line in lines}) == len(lines)
    assert Counter((line["photo"], line["variant"]) for line in lines) == {
        (p, v): 1 for p in photos for v in range(VARIANTS)
    }
    statuses = Counter(line["status"] for line in lines)
    counts = body["counts"]
    assert {s: counts[s] for s in statuses} == dict(statuses)
    assert counts["planned"] == counts["finished"] == len(lines)
    failed = {line["photo"] for line in lines if line["status"] == "failed"}
    assert failed == {"broken.jpg", "tiny.png"}
    assert body["report"]["items"] == len(lines)

    # The labels load with `procrop train`'s reader; each first crop is the placed region.
    store, prefix = build_object_store(settings), body["prefix"]
    (tmp_path / "labels.jsonl").write_bytes(store.get(prefix + "labels.jsonl"))
    labels = load_jsonl(tmp_path / "labels.jsonl", tmp_path)
    assert len(labels) == statuses["accepted"] > 0
    for image, photo in labels.items():
        item = image.split("/")[1]
        scene = json.loads(store.get(f"{prefix}items/{item}/scene.json"))
        width, height = scene["canvas"]
        x1, y1, x2, y2 = scene["box"]
        assert (photo.width, photo.height) == (width, height)
        assert photo.crops_norm[0] == pytest.approx(
            (x1 / width, y1 / height, x2 / width, y2 / height), abs=1e-6
        )
        with Image.open(io.BytesIO(store.get(prefix + image))) as canvas:
            assert canvas.size == (width, height)

    # A redelivered fill task changes nothing: the slot is final, counted once.
    objects = sorted(store.list(prefix))
    done = next(line for line in lines if line["status"] == "accepted")
    message = {"job_id": job_id, "slot": done["slot"], "photo": done["photo"], "variant": done["variant"],
               "source": body["params"]["source"], "seed": 7, "profile": "lite", "item": done["item"]}  # fmt: skip
    create_celery(settings).signature(CAD_FILL, args=(message,)).apply_async()
    time.sleep(3)
    again = client.get(f"/v1/datasets/{job_id}", headers=HEADERS).json()
    assert again["counts"] == counts
    assert sorted(store.list(prefix)) == objects


def test_a_named_run_resumes_without_making_items_again(
    client: TestClient, workers: Any, photos: list[str], settings: Settings
) -> None:
    request = {"source": "pro/", "variants": 1, "seed": 3, "run": "resume-me", "limit": 3}
    first = client.post("/v1/datasets", headers=HEADERS, json=request)
    job_id = first.json()["job_id"]
    assert _wait_done(client, job_id)["status"] == "succeeded"
    store = build_object_store(settings)
    before = {key: store.get(key) for key in store.list(f"datasets/{job_id}/items/")}

    second = client.post("/v1/datasets", headers=HEADERS, json=request)
    assert second.status_code == 202 and second.json()["job_id"] == job_id
    assert _wait_done(client, job_id)["counts"]["planned"] == 3
    assert {key: store.get(key) for key in store.list(f"datasets/{job_id}/items/")} == before

    conflict = client.post("/v1/datasets", headers=HEADERS, json={**request, "seed": 4})
    assert conflict.status_code == 409, conflict.text


def test_cancel_starts_no_new_items_and_the_manifest_says_which_finished(
    client: TestClient, workers: Any, photos: list[str], settings: Settings
) -> None:
    answer = client.post(
        "/v1/datasets", headers=HEADERS, json={"source": "pro/", "variants": 4, "seed": 11}
    )
    job_id = answer.json()["job_id"]
    cancelled = client.delete(f"/v1/datasets/{job_id}", headers=HEADERS)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    body = _wait_done(client, job_id)
    lines = _manifest(client, job_id)
    assert body["status"] == "cancelled"
    assert len(lines) == body["counts"]["planned"] < len(photos) * 4  # planning stopped
    assert all(line["status"] != "queued" for line in lines)
    assert Counter(line["status"] for line in lines)["cancelled"] == body["counts"]["cancelled"]
    state = RunState(client.app.state.clients.jobs.redis, job_id)  # type: ignore[attr-defined]
    assert not state.queued_slots()


@pytest.mark.parametrize(
    ("request_body", "code", "needle"),
    [
        ({"source": "nothing-here/"}, 422, "nothing under"),
        ({"source": "uploads/"}, 422, "source"),
        ({"source": "pro/", "variants": 0}, 422, "variants"),
        ({"source": "pro/", "variants": 10_000}, 422, "variants"),
        ({"source": "pro/", "run": "Bad Name"}, 422, "run"),
    ],
)
def test_bad_run_parameters_get_a_4xx_with_the_reason(
    client: TestClient, photos: list[str], request_body: dict[str, Any], code: int, needle: str
) -> None:
    answer = client.post("/v1/datasets", headers=HEADERS, json=request_body)
    assert answer.status_code == code, answer.text
    assert needle in answer.text


def test_another_key_cannot_see_a_run(
    client: TestClient, photos: list[str], settings: Settings
) -> None:
    job_id = client.post(
        "/v1/datasets", headers=HEADERS, json={"source": "pro/", "limit": 1}
    ).json()["job_id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert client.get(f"/v1/datasets/{job_id}", headers=other).status_code == 404
    assert client.get(f"/v1/datasets/{job_id}/manifest", headers=other).status_code == 404
    assert client.delete(f"/v1/datasets/{job_id}", headers=other).status_code == 404
    assert client.delete(f"/v1/datasets/{job_id}", headers=HEADERS).status_code == 200
