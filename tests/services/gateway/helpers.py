"""Helpers of the gateway's tests: submit a photo, and check an answer's status code and body
(`{"detail": reason}` for errors; a 202 with its job id), and read a Celery message off Redis."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Protocol

from fastapi.testclient import TestClient


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


def submit_photo(
    client: TestClient, headers: dict[str, str], data: bytes, name: str = "photo.jpg", **fields: Any
) -> Answer:
    files = {"image": (name, data, "application/octet-stream")}
    form = {k: str(v) for k, v in fields.items()}
    return client.post("/v1/crops", headers=headers, files=files, data=form)


def accepted_job_id(response: Answer) -> str:
    """The job id of a 202 answer (checked: body and Location agree)."""
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and len(body["job_id"]) == 32
    assert response.headers["location"].endswith(body["job_id"])
    return str(body["job_id"])


def detail_of(response: Answer, code: int) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def task_message(raw: str) -> tuple[str, list[Any], dict[str, Any]]:
    """A Celery (protocol 2) message from a Redis queue: task name, args, embed options."""
    message = json.loads(raw)
    args, _kwargs, embed = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["task"], args, embed
