"""The index worker's re-check (`services/retriever/worker.py`): an index job put on the queue by
hand, past the gateway, still writes only its owner's collections from sources it may read
(`shared/ownership.py`). Real Redis (job records) and a real S3 server (the photos)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.retriever import worker as retriever_worker
from shared import worker
from shared.jobs import JobStore
from shared.settings import Settings, get_settings
from shared.storage import build_object_store

OWNER = "0123456789abcdef"


@pytest.fixture
def env(
    s3_settings: Settings, redis_url: str, photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """The worker's process-wide settings and clients on this test's Redis and bucket, with
    photos under `pro/` and under `uploads/` (another tenant's)."""
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", redis_url)
    monkeypatch.setenv("PROCROP_CROP__COLLECTION", f"t{OWNER}_shared")
    caches = (get_settings, worker.jobs, worker.object_store, retriever_worker.vector_index)
    for cached in caches:
        cached.cache_clear()
    store = build_object_store(s3_settings)
    for photo in sorted(photo_dir.glob("*.jpg"))[:2]:
        store.put(f"pro/{photo.name}", photo.read_bytes())
        store.put(f"uploads/{photo.stem}.jpg", photo.read_bytes())
    yield get_settings()
    for cached in caches:
        cached.cache_clear()


def _params(settings: Settings, **changes: Any) -> dict[str, Any]:
    bucket = settings.storage.bucket
    params = {"collection": f"t{OWNER}_pro", "source": f"s3://{bucket}/pro/", "encoder": "lite",
              "annotations_key": None}  # fmt: skip
    return {**params, **{k: v.replace("{bucket}", bucket) for k, v in changes.items()}}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"collection": "pro"}, "not owned"),  # a bare name: an operator's collection
        ({"collection": "tfedcba9876543210_pro"}, "not owned"),  # another tenant's
        ({"collection": f"t{OWNER}_shared"}, "crop model's index"),  # PROCROP_CROP__COLLECTION
        ({"source": "s3://{bucket}/uploads/"}, "source"),
        ({"source": "s3://{bucket}//uploads/"}, "source"),
        ({"source": "s3://other-bucket/pro/"}, "bucket"),
        ({"source": "/etc/"}, "source"),  # a folder of the worker's host
        ({"source": "s3://{bucket}/pro"}, "canonical"),  # not as the gateway writes it
        ({"annotations_key": "jobs/abc/report.json"}, "annotations_key"),
    ],
)
def test_injected_index_jobs_fail_before_listing(
    env: Settings, changes: dict[str, str], reason: str
) -> None:
    jobs = JobStore.from_url(env.queue.redis_url)
    job = jobs.create("index", OWNER, _params(env, **changes))
    with pytest.raises(ValueError, match=reason):
        retriever_worker.plan_index(job.id)
    with pytest.raises(ValueError, match=reason):
        retriever_worker.index_batch_photos(job.id, 0)
    store = build_object_store(env)
    assert not store.exists(f"jobs/{job.id}/plan.json")  # nothing listed, nothing queued


def test_a_job_as_the_gateway_writes_it_passes(env: Settings) -> None:
    jobs = JobStore.from_url(env.queue.redis_url)
    job = jobs.create("index", OWNER, _params(env))
    assert retriever_worker._index_params(job.id) == job.params
