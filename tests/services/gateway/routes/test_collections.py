"""Indexing jobs (`services/gateway/routes/collections.py`): POST /v1/collections/{name}/index,
and who may write which collection from which source (`shared/ownership.py`)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from shared.jobs import JobStore
from shared.queue import INDEX_PLAN
from shared.settings import Settings

from ..conftest import ALICE_KEY, BOB_KEY
from ..helpers import accepted_job_id, detail_of, task_message


def _owner(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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
        "collection": f"t{_owner(ALICE_KEY)}_pro", "name": "pro", "source": f"s3://{bucket}/pro/",
        "encoder": None, "annotations_key": None,
    }  # fmt: skip


def test_each_key_writes_its_own_collections(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], broker: redis.Redis
) -> None:
    """Alice's and Bob's "pro" are two collections; neither is a name the crop stage reads."""
    jobs = JobStore(broker)
    stored = []
    for headers in (alice, bob):
        response = client.post("/v1/collections/pro/index", headers=headers, json={"source": "a/"})
        stored.append(jobs.get(accepted_job_id(response)).params["collection"])
    assert stored == [f"t{_owner(ALICE_KEY)}_pro", f"t{_owner(BOB_KEY)}_pro"]


@pytest.mark.parametrize(
    "source",
    [
        "uploads/", "uploads", "/uploads/", "//uploads", "./uploads/", "pro/../uploads/",
        "s3://{bucket}/uploads/", "s3://{bucket}//uploads/", "s3://{bucket}/./uploads",
        "jobs/", "features/effnet-1/", "datasets/run1/", "collections/x/tokens/", "checkpoints/",
        "s3://other-bucket/photos/", "s3://{bucket}", "s3://{bucket}/", "", "/", "s3://",
        "pro/\x00/", "pro\\photos/", "a" * 2000,
    ],
)  # fmt: skip
def test_sources_a_tenant_may_not_read_are_422(
    client: TestClient,
    gateway_settings: Settings,
    alice: dict[str, str],
    broker: redis.Redis,
    source: str,
) -> None:
    source = source.replace("{bucket}", gateway_settings.storage.bucket)
    response = client.post("/v1/collections/pro/index", headers=alice, json={"source": source})
    detail = detail_of(response, 422)
    assert "source" in detail and len(detail) < 300  # long values are cut, not echoed whole
    assert broker.llen("index") == 0


def test_another_bucket_only_when_settings_allow_it(
    gateway_env: pytest.MonkeyPatch, alice: dict[str, str], broker: redis.Redis
) -> None:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.settings import load_settings

    gateway_env.setenv("PROCROP_STORAGE__INDEX_BUCKETS", "pro-photos,other")
    with TestClient(create_app(load_settings())) as client:
        body = {"source": "s3://pro-photos//2024//"}
        response = client.post("/v1/collections/pro/index", headers=alice, json=body)
        source = JobStore(broker).get(accepted_job_id(response)).params["source"]
        assert source == "s3://pro-photos/2024/"  # canonical
        body = {"source": "s3://pro-photos-2/x/"}
        assert "bucket" in detail_of(
            client.post("/v1/collections/pro/index", headers=alice, json=body), 422
        )


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("1bad-name", {"source": "pro/"}, "name: String should match pattern"),
        ("a" * 201, {"source": "pro/"}, "name: String should have at most 200 characters"),
        ("pro", {"source": "pro/", "annotations_key": "../a.json"}, "../a.json"),
        ("pro", {"source": "pro/", "annotations_key": "jobs/x/report.json"}, "annotations_key"),
        ("pro", {"source": "pro/", "annotations_key": "uploads/a.json"}, "annotations_key"),
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
