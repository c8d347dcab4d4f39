"""A CAD run whose messages were lost still finishes, every item once (shared/recovery.py), on real
workers over a real Redis and S3 server: the planner's first message lost (as with the last
second of writes of a killed Redis), then the first items' messages lost while a dead planner
pass still holds the run's lock. The gateway's recovery pass finds the run stalled and has its
planner send again what no message holds, once the dead pass's lock has expired. A cancelled
run whose items in flight were lost winds up the same way: they end as cancelled, its manifest is
written."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from procrop.servers import ServerProcess
from services.gateway.app import create_app
from shared.runs import RunState
from shared.settings import Settings, load_settings
from shared.storage import build_object_store
from tests.services.outpainter.test_dataset_runs import _kill_group, _start_worker

API_KEY = "recovery-test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def env(
    tmp_path: Path, redis_server: ServerProcess, s3_server: ServerProcess
) -> Iterator[dict[str, str]]:
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    values = {
        "PROCROP_HOME": str(tmp_path / "home"),
        "PROCROP_QUEUE__REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/6",
        "PROCROP_QUEUE__POOL": "solo",
        "PROCROP_QUEUE__RECOVER_AFTER_S": "2",
        "PROCROP_QUEUE__RECOVER_EVERY_S": "1",
        "PROCROP_STORAGE__BACKEND": "s3",
        "PROCROP_STORAGE__ENDPOINT": f"127.0.0.1:{s3_server.port}",
        "PROCROP_STORAGE__ACCESS_KEY": S3_ACCESS_KEY,
        "PROCROP_STORAGE__SECRET_KEY": S3_SECRET_KEY,
        "PROCROP_STORAGE__BUCKET": "cad-recovery",
        "PROCROP_CAD__MAX_IN_FLIGHT": "2",
        "PROCROP_API_KEYS": API_KEY,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client
    client.app.state.clients.jobs.redis.flushdb()  # type: ignore[attr-defined]


def _poll(check: Any, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_run_whose_messages_were_lost_finishes_with_every_item_once(
    client: TestClient, settings: Settings, env: dict[str, str], photo_dir: Path, tmp_path: Path
) -> None:
    store = build_object_store(settings)
    photos = sorted(path.name for path in photo_dir.iterdir())
    for name in photos:
        store.put(f"lost/{name}", (photo_dir / name).read_bytes())
    broker = client.app.state.clients.jobs.redis  # type: ignore[attr-defined]
    answer = client.post(
        "/v1/datasets", headers=HEADERS, json={"source": "lost/", "variants": 1, "seed": 5}
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    broker.delete("index")  # the planner's message is lost: no worker has seen it

    procs = {"index": _start_worker("index", env, tmp_path)}
    try:
        # The recovery pass wakes the planner, which plans the first items (no embed worker yet).
        _poll(lambda: broker.llen("embed") == 2, "the first items to be planned again")
        state = RunState(broker, job_id)
        broker.delete("embed")  # ... whose messages are lost in turn
        broker.set(state.lock_key, "a-dead-pass", ex=4)  # while a dead pass holds the lock
        procs |= {q: _start_worker(q, env, tmp_path) for q in ("embed", "outpaint")}

        deadline = time.monotonic() + 150
        while (body := client.get(f"/v1/datasets/{job_id}", headers=HEADERS).json())[
            "status"
        ] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, f"the run did not finish: {body}"
            time.sleep(0.5)
    finally:
        for proc in procs.values():
            _kill_group(proc)

    assert body["status"] == "succeeded", body
    lines = client.get(f"/v1/datasets/{job_id}/manifest", headers=HEADERS).text.splitlines()
    manifest = [json.loads(line) for line in lines]
    assert Counter(line["photo"] for line in manifest) == {name: 1 for name in photos}
    counts = body["counts"]
    assert counts["planned"] == counts["finished"] == len(photos) and counts["in_flight"] == 0
    assert counts["accepted"] + counts["rejected"] == len(photos)
    made = {key.split("/")[3] for key in store.list(f"datasets/{job_id}/items/")}
    assert made == {line["item"] for line in manifest}
    assert int(broker.hget(f"procrop:job:{job_id}", "resent")) >= 2


def test_a_cancelled_run_whose_items_were_lost_winds_up(
    client: TestClient, settings: Settings, env: dict[str, str], photo_dir: Path, tmp_path: Path
) -> None:
    store = build_object_store(settings)
    for path in sorted(photo_dir.iterdir()):
        store.put(f"gone/{path.name}", path.read_bytes())
    broker = client.app.state.clients.jobs.redis  # type: ignore[attr-defined]
    answer = client.post("/v1/datasets", headers=HEADERS, json={"source": "gone/", "variants": 1})
    job_id = answer.json()["job_id"]
    procs = {"index": _start_worker("index", env, tmp_path)}
    try:
        _poll(lambda: broker.llen("embed") == 2, "the first items to be planned")
        assert client.delete(f"/v1/datasets/{job_id}", headers=HEADERS).status_code == 200
        broker.delete("embed")  # the items in flight are lost: nothing would ever finish them
        procs |= {q: _start_worker(q, env, tmp_path) for q in ("embed", "outpaint")}
        _poll(
            lambda: store.exists(f"datasets/{job_id}/report.json"),
            "the report of the cancelled run",
        )
    finally:
        for proc in procs.values():
            _kill_group(proc)
    body = client.get(f"/v1/datasets/{job_id}", headers=HEADERS).json()
    assert body["status"] == "cancelled"
    assert (
        body["counts"]["in_flight"] == 0
        and body["counts"]["cancelled"] == 2 == body["counts"]["planned"]
    )
    lines = client.get(f"/v1/datasets/{job_id}/manifest", headers=HEADERS).text.splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["cancelled", "cancelled"]
