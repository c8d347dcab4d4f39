"""Indexing jobs (`services/gateway/routes/collections.py`): POST /v1/collections/{name}/index."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from shared.jobs import JobStore
from shared.queue import INDEX_PLAN
from shared.settings import Settings

from ..helpers import accepted_job_id, detail_of, task_message


def test_index_job_is_queued(
    client: TestClient,
    gateway_settings: Settings,
    alice: dict[str, str],
    bob: dict[str, str],
    broker: redis.Redis,
) -> None:
    response = client.post("/v1/collections/pro/index", headers=alice, json={"source": "pro/"})
    job_id = accepted_job_id(response)
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert broker.llen("index") == 1 and broker.llen("embed") == 0
    task, args, _ = task_message(str(broker.lindex("index", 0)))
    assert (task, args) == (INDEX_PLAN, [job_id])
    body = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert (body["kind"], body["status"], body["progress"]) == (
        "index", "queued", {"done": 0, "total": 0}
    )  # fmt: skip
    assert detail_of(client.get(f"/v1/jobs/{job_id}", headers=bob), 404)
    assert detail_of(client.get(f"/v1/crops/{job_id}", headers=alice), 404)  # not a crop job
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
        (
            "pro",
            {"source": "pro/", "encoder": "clip"},
            "encoder: Input should be 'effnet', 'lite' or 'sam'",
        ),
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
    assert reason in detail_of(response, 422)
    assert broker.llen("index") == 0
