"""API keys (`services/gateway/deps.py`): every route needs a valid one."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from .helpers import detail_of, submit_photo


@pytest.mark.parametrize("auth", [None, "Bearer not-a-key-0123456789", "Basic YWxpY2U6eA=="])
def test_requests_without_a_valid_key_are_refused(
    client: TestClient, photo: bytes, broker: redis.Redis, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    for response in (
        submit_photo(client, headers, photo),
        client.get(f"/v1/crops/{'0' * 32}", headers=headers),
        client.post("/v1/collections/pro/index", headers=headers, json={"source": "pro/"}),
    ):
        assert "API key" in detail_of(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert broker.llen("embed") == broker.llen("index") == 0
    assert not broker.keys("procrop:job:*")
