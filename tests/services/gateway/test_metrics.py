"""Prometheus metrics (`services/gateway/metrics.py`): queue depths and requests by route."""

from __future__ import annotations

from fastapi.testclient import TestClient

from .helpers import accepted_job_id, submit_photo


def test_metrics_show_queue_depth_and_requests(
    client: TestClient, alice: dict[str, str], photo: bytes
) -> None:
    job_id = accepted_job_id(submit_photo(client, alice, photo))
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
