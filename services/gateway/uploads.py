"""Uploads: a body-size limit enforced while the body streams in, and photos checked by content.

`BodyLimit` is plain ASGI middleware: a declared Content-Length over the limit is refused before
any byte is read; otherwise bytes are counted as the app receives them and the request fails with
413 the moment the count passes the limit, so an oversized upload is never held whole.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidImageError
from shared.images import content_hash, decode_image
from shared.storage.keys import upload_key

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields on top of the photo
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"upload over the limit of {limit / 2**20:g} MiB (PROCROP_GATEWAY__MAX_UPLOAD_MB)",
    )


class BodyLimit:
    """Refuse request bodies over `limit` bytes (+ form overhead) while they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.limit + FORM_OVERHEAD
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > allowed:
            await _send_json(send, 413, too_large(self.limit).detail)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > allowed:
                raise too_large(self.limit)  # answered by FastAPI's exception handler
            return message

        await self.app(scope, counted, send)


async def _send_json(send: Send, code: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def checked_photo(data: bytes, name: str, max_pixels: int, limit: int | None) -> dict[str, Any]:
    """Decode `data` fully (its content decides, not its name); returns its sha256, object key,
    MIME type, width and height. Raises 413 over `limit` bytes (None: no limit), 415 for anything
    that is not a readable photo."""
    if limit is not None and len(data) > limit:
        raise too_large(limit)
    try:
        image = decode_image(data, name, max_pixels)
        fmt = _format_of(data)
    except InvalidImageError as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from None
    sha = content_hash(data)
    return {
        "sha256": sha,
        "key": upload_key(sha, fmt),
        "mime": _MIME.get(fmt, "application/octet-stream"),
        "width": image.width,
        "height": image.height,
    }


def _format_of(data: bytes) -> str:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return _EXTENSIONS.get(image.format or "", "bin")
