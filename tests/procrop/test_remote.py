"""`procrop cad --gateway`'s status poll (procrop/remote.py) against a gateway that is away: it
asks again through connection errors and 5xx answers, gives up with one clear line after its
patience, and takes a 4xx answer at once. (The real gateway, restarting Redis under it, is in
tests/e2e/test_cad_stack.py.)"""

from __future__ import annotations

import httpx
import pytest

from procrop import remote
from shared.errors import ProCropError


def _client(answers: list[int | Exception]) -> tuple[httpx.Client, list[int]]:
    calls: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"status": "running", "detail": "no such run"})

    return httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handle)), calls


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "POLL_S", 0.01)


def test_a_gateway_away_for_a_while_is_asked_again() -> None:
    client, calls = _client([httpx.ConnectError("refused"), 503, 502, 200])
    assert remote.dataset_status(client, "job")["status"] == "running"
    assert len(calls) == 4


def test_a_gateway_away_for_too_long_is_one_clear_error() -> None:
    client, calls = _client([503])
    with pytest.raises(ProCropError, match=r"no status of run job for 0 s \(gateway answered 503"):
        remote.dataset_status(client, "job", patience_s=0.05)
    assert len(calls) >= 2


def test_a_4xx_answer_is_not_asked_again() -> None:
    client, calls = _client([404, 200])
    with pytest.raises(ProCropError, match="gateway answered 404: no such run"):
        remote.dataset_status(client, "job")
    assert len(calls) == 1
