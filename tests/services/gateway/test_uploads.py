"""Uploads (`services/gateway/uploads.py`): photos checked by content, and the body-size
limit enforced while the body streams in."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from shared.settings import Settings
from shared.storage import build_object_store

from .helpers import accepted_job_id, detail_of, submit_photo

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (bytes(range(256)) * 40, "photo.jpg"),  # random-looking bytes
        (b"just some text, not a photo\n" * 20, "notes.jpg"),
        (b"", "empty.jpg"),
    ],
)
def test_uploads_that_are_not_photos_are_refused(
    client: TestClient, alice: dict[str, str], broker: redis.Redis, data: bytes, name: str
) -> None:
    detail = detail_of(submit_photo(client, alice, data, name=name), 415)
    assert "image" in detail  # names the field
    assert broker.llen("embed") == 0


def test_truncated_jpeg_is_refused(client: TestClient, alice: dict[str, str], photo: bytes) -> None:
    assert "image" in detail_of(submit_photo(client, alice, photo[: len(photo) // 2]), 415)


def _png(size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


def test_content_decides_not_the_name(
    client: TestClient, gateway_settings: Settings, alice: dict[str, str]
) -> None:
    png = _png()
    job_id = accepted_job_id(submit_photo(client, alice, png, name="notes.txt"))
    key = f"uploads/{hashlib.sha256(png).hexdigest()}.png"
    assert build_object_store(gateway_settings).exists(key)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "queued"


def _oversized_form(boundary: str, size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A multipart body with a `size`-byte file, in chunks."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    for _ in range(size // chunk):
        yield b"\xff" * chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_oversized_upload_with_content_length(
    client: TestClient, alice: dict[str, str], broker: redis.Redis
) -> None:
    response = submit_photo(client, alice, b"\xff" * (2 * MiB))
    assert int(response.request.headers["content-length"]) > 2 * MiB
    assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in detail_of(response, 413)
    assert broker.llen("embed") == 0


def test_oversized_upload_streamed_without_content_length(
    client: TestClient, alice: dict[str, str], broker: redis.Redis
) -> None:
    boundary = "procrop-test-boundary"
    response = client.post(
        "/v1/crops",
        headers={**alice, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=_oversized_form(boundary, 2 * MiB),
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in detail_of(response, 413)
    assert broker.llen("embed") == 0


def test_oversized_stream_is_refused_before_it_is_read_whole(
    client: TestClient, alice: dict[str, str]
) -> None:
    """Chunk by chunk through the ASGI app (TestClient reads a body whole before sending it)."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for part in _oversized_form("b0undary", 8 * MiB):
            sent += len(part)
            yield part

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            headers = {**alice, "Content-Type": "multipart/form-data; boundary=b0undary"}
            return await http.post("/v1/crops", headers=headers, content=body())

    response = client.portal.call(post)  # type: ignore[union-attr]
    assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in detail_of(response, 413)
    assert sent < 2 * MiB  # stopped reading just past the 1 MiB limit, not at 8 MiB


def test_oversized_json_is_refused_too(client: TestClient, alice: dict[str, str]) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"source": "'
        for _ in range(32):
            yield b"p" * (64 * 1024)
        yield b'"}'

    for path in ("/v1/crops", "/v1/collections/pro/index"):
        response = client.post(
            path, headers={**alice, "Content-Type": "application/json"}, content=body()
        )
        assert "PROCROP_GATEWAY__MAX_UPLOAD_MB" in detail_of(response, 413)


def test_upload_just_under_the_limit_is_read(client: TestClient, alice: dict[str, str]) -> None:
    """Not refused by size: decoded, and refused as a photo instead."""
    detail = detail_of(submit_photo(client, alice, b"\xff" * (MiB - 1024)), 415)
    assert "MAX_UPLOAD" not in detail


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_gateway_memory_stays_flat_under_big_uploads(
    gateway_process: tuple[str, int], alice: dict[str, str]
) -> None:
    """8 concurrent uploads of a 160 KB PNG of 7000 x 7000 pixels (147 MB decoded, under the
    50 MP cap): all answered, the gateway's peak resident memory under 700 MB (it was 2.2-2.9 GB
    when the gateway decoded photos)."""
    from concurrent.futures import ThreadPoolExecutor

    url, pid = gateway_process
    png = _png((7000, 7000))
    assert len(png) < 200 * 1024

    def upload(i: int) -> int:
        files = {"image": (f"big{i}.png", png, "image/png")}
        return httpx.post(url + "/v1/crops", headers=alice, files=files, timeout=120).status_code

    idle = _peak_rss(pid)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(upload, range(8)))
    peak = _peak_rss(pid)
    print(f"gateway peak RSS: idle {idle / 2**20:.0f} MiB, after 8 uploads {peak / 2**20:.0f} MiB")
    assert codes == [202] * 8
    assert peak < 700 * 2**20, f"{peak / 2**20:.0f} MiB"
