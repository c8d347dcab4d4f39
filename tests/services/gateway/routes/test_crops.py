"""Crop jobs (`services/gateway/routes/crops.py`): POST /v1/crops (multipart or JSON),
GET and DELETE /v1/crops/{job_id}."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from shared.queue import CROP, EMBED, RETRIEVE
from shared.settings import Settings
from shared.storage import build_object_store

from ..helpers import accepted_job_id, detail_of, submit_photo, task_message

KEY = "uploads/" + "0" * 64 + ".jpg"  # a well-formed key nobody uploaded


def test_upload_is_queued_and_stored_once(
    client: TestClient, gateway_settings: Settings, alice: dict[str, str], photo: bytes
) -> None:
    first = accepted_job_id(submit_photo(client, alice, photo, n=3))
    second = accepted_job_id(submit_photo(client, alice, photo))
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


def test_submit_sends_the_chain_to_the_embed_queue(
    client: TestClient, alice: dict[str, str], photo: bytes, broker: redis.Redis
) -> None:
    job_id = accepted_job_id(submit_photo(client, alice, photo, n=2, aspect_ratios="16:9, 1:1"))
    depths = {q: broker.llen(q) for q in ("embed", "retrieve", "crop", "outpaint", "index")}
    assert depths == {"embed": 1, "retrieve": 0, "crop": 0, "outpaint": 0, "index": 0}
    task, args, embed = task_message(str(broker.lindex("embed", 0)))
    assert task == EMBED
    (message,) = args
    assert message["job_id"] == job_id and message["sha256"] == hashlib.sha256(photo).hexdigest()
    assert (message["n"], message["aspect_ratios"]) == (2, ["16:9", "1:1"])
    assert message["image_key"] == f"uploads/{message['sha256']}.jpg"
    rest = [signature["task"] for signature in reversed(embed["chain"])]
    assert rest == [RETRIEVE, CROP]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"n": 101}, "n: Input should be less than or equal to 100"),
        ({"n": "many"}, "n: Input should be a valid integer"),
        ({"aspect_ratios": "abc"}, "aspect ratio must be 'W:H'"),
        ({"aspect_ratios": "16:9,0:1"}, "'0:1'"),
        ({"aspect_ratios": "100000:1"}, "between 1:10 and 10:1"),
        ({"aspect_ratios": "1:10.01"}, "between 1:10 and 10:1"),
        ({"aspect_ratios": "1:1," * 200}, "at most 528 characters per field"),
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
    assert reason in detail_of(submit_photo(client, alice, photo, **fields), 422)
    assert broker.llen("embed") == 0


def test_missing_image_field_is_422(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops", headers=alice, files={"photo": ("a.jpg", b"x")}, data={"n": "2"}
    )
    assert "'image'" in detail_of(response, 422)


def test_plain_text_body_is_415(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops", headers={**alice, "Content-Type": "text/plain"}, content=b"crop it"
    )
    detail = detail_of(response, 415)
    assert "text/plain" in detail and "multipart/form-data" in detail


def test_invalid_json_is_400(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops", headers={**alice, "Content-Type": "application/json"}, content=b"{oops"
    )
    assert "invalid JSON" in detail_of(response, 400)


def test_json_body_that_is_not_utf8_is_400(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/crops",
        headers={**alice, "Content-Type": "application/json"},
        content=b'{"image_key": "uploads/\xff.jpg"}',
    )
    assert "invalid JSON" in detail_of(response, 400)


def test_json_request_for_an_uploaded_photo(
    client: TestClient, alice: dict[str, str], photo: bytes, broker: redis.Redis
) -> None:
    accepted_job_id(submit_photo(client, alice, photo))
    key = f"uploads/{hashlib.sha256(photo).hexdigest()}.jpg"
    job_id = accepted_job_id(
        client.post("/v1/crops", headers=alice, json={"image_key": key, "n": 4})
    )
    assert broker.llen("embed") == 2
    body = client.get(f"/v1/crops/{job_id}", headers=alice).json()
    assert body["status"] == "queued"


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        ({"image_key": KEY}, 404, f"no upload {KEY!r}"),
        ({"image_key": "uploads/nothing-here.jpg"}, 422, "image_key: String should match"),
        ({"image_key": "../x"}, 422, "image_key: String should match"),
        ({"image_key": "/etc/passwd"}, 422, "image_key: String should match"),
        ({"image_key": "pro/photo.jpg"}, 422, "image_key: String should match"),  # not an upload
        ({"image_key": KEY.replace("0", "\x01", 1)}, 422, "image_key"),  # was a 503
        ({"image_key": KEY[:-4] + ".JPG"}, 422, "image_key"),
        ({"image_key": KEY, "n": 0}, 422, "n: Input should be greater than"),
        ({"image_key": KEY, "aspect_ratios": ["abc"]}, 422, "got 'abc'"),
        ({"image_key": KEY, "aspect_ratios": ["100000:1"]}, 422, "between 1:10 and 10:1"),
        ({"image_key": KEY, "aspect_ratios": ["1" * 40 + ":1"]}, 422, "at most 32 characters"),
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
    assert reason in detail_of(client.post("/v1/crops", headers=alice, json=payload), code)
    assert broker.llen("embed") == 0


def test_image_key_names_only_your_own_uploads(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    photo: bytes,
    broker: redis.Redis,
) -> None:
    """Bob cannot crop (or learn of) Alice's upload: the same 404 as for a key nobody sent."""
    accepted_job_id(submit_photo(client, alice, photo))
    key = f"uploads/{hashlib.sha256(photo).hexdigest()}.jpg"
    theirs = detail_of(client.post("/v1/crops", headers=bob, json={"image_key": key}), 404)
    missing = detail_of(client.post("/v1/crops", headers=bob, json={"image_key": KEY}), 404)
    assert theirs == missing.replace(KEY, key)
    assert broker.llen("embed") == 1  # Alice's upload only
    accepted_job_id(client.post("/v1/crops", headers=alice, json={"image_key": key}))
    accepted_job_id(submit_photo(client, bob, photo))  # once Bob sends it too, it is his as well
    accepted_job_id(client.post("/v1/crops", headers=bob, json={"image_key": key}))


def test_huge_image_key_is_not_echoed(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post("/v1/crops", headers=alice, json={"image_key": "k" * 900_000})
    assert "image_key" in detail_of(response, 422)
    assert len(response.content) < 1000


def test_cancel_a_queued_job(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], photo: bytes
) -> None:
    job_id = accepted_job_id(submit_photo(client, alice, photo))
    assert "no crop job" in detail_of(client.delete(f"/v1/crops/{job_id}", headers=bob), 404)
    cancelled = client.delete(f"/v1/crops/{job_id}", headers=alice)
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert (body["job_id"], body["status"]) == (job_id, "cancelled")
    assert body["updated"] >= body["created"]
    assert "cancelled" in detail_of(client.delete(f"/v1/crops/{job_id}", headers=alice), 409)
    assert client.get(f"/v1/crops/{job_id}", headers=alice).json()["status"] == "cancelled"
