"""Uploads: a body-size limit enforced while the body streams in, and photos checked by content.

`BodyLimit` is plain ASGI middleware: a declared Content-Length over the limit is refused before
any byte is read; otherwise bytes are counted as the app receives them and the request fails with
413 the moment the count passes the limit, so an oversized upload is never held whole.

Photos are checked, never decoded whole, here (`shared.images.check_photo`: header, pixel cap,
a verification of bounded memory), and at most `CHECKS` at once; the full decode is the workers'.
The gateway's memory so stays flat whatever the photo's pixel count (a 160 KB PNG of 7000 x 7000
pixels cost it about 300 MB when it decoded photos; `tests/services/gateway/test_uploads.py`
measures a real gateway process).
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidImageError
from shared.images import check_photo, content_hash
from shared.storage.keys import upload_key

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields on top of the photo
CHECKS = 2  # photos checked at once (one per core); others wait their turn
_checks = threading.BoundedSemaphore(CHECKS)
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
    """Check `data` (its content decides, not its name) without decoding it whole; returns its
    sha256, object key, MIME type, width and height. Raises 413 over `limit` bytes (None: no
    limit), 415 for anything that is not a readable photo."""
    if limit is not None and len(data) > limit:
        raise too_large(limit)
    try:
        with _checks:
            info = check_photo(data, name, max_pixels)
    except InvalidImageError as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from None
    sha, ext = content_hash(data), _EXTENSIONS[info.format]
    return {
        "sha256": sha, "key": upload_key(sha, ext), "mime": _MIME[ext],
        "width": info.width, "height": info.height,
    }  # fmt: skip
