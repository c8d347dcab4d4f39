"""Any job (`services/gateway/routes/jobs.py`): GET /v1/jobs/{job_id}."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ..helpers import accepted_job_id, detail_of, submit_photo


def test_any_job_view_of_a_crop_job(
    client: TestClient, alice: dict[str, str], photo: bytes
) -> None:
    job_id = accepted_job_id(submit_photo(client, alice, photo))
    got = client.get(f"/v1/jobs/{job_id}", headers=alice)
    assert got.status_code == 200
    body = got.json()
    assert (body["kind"], body["status"]) == ("crop", "queued")
    assert body["progress"] == {"done": 0, "total": 1}
    assert detail_of(client.get("/v1/jobs/not-a-job", headers=alice), 404)
