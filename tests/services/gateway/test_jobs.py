"""Jobs as the gateway sees them (`services/gateway/jobs.py`): private to their key, and
waited for (`wait`) until they finish or the wait ends."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from fastapi.testclient import TestClient

from shared.jobs import KEY_PREFIX, JobStore
from shared.settings import Settings
from shared.storage import build_object_store
from shared.storage.keys import job_key

from .helpers import accepted_job_id, detail_of, submit_photo


def test_jobs_are_private_to_their_key(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], photo: bytes
) -> None:
    job_id = accepted_job_id(submit_photo(client, alice, photo))
    missing = "f" * 32
    theirs = detail_of(client.get(f"/v1/crops/{job_id}", headers=bob), 404)
    nobody = detail_of(client.get(f"/v1/crops/{missing}", headers=bob), 404)
    assert theirs.replace(job_id, missing) == nobody  # nothing tells the two apart
    assert detail_of(client.get(f"/v1/jobs/{job_id}", headers=bob), 404)


def test_wait_answers_202_after_the_wait_without_workers(
    client: TestClient, alice: dict[str, str], photo: bytes
) -> None:
    started = time.monotonic()
    response = submit_photo(client, alice, photo, wait=0.5)
    took = time.monotonic() - started
    job_id = accepted_job_id(response)
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
    response = submit_photo(client, alice, photo, wait=20)
    assert time.monotonic() - started < 10  # answered when the job ended, not after 20 s
    worker.join(timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["result"], body["error"]) == ("succeeded", result, None)
    assert client.get(f"/v1/crops/{body['job_id']}", headers=alice).json() == body
    detail = detail_of(client.delete(f"/v1/crops/{body['job_id']}", headers=alice), 409)
    assert "succeeded" in detail
