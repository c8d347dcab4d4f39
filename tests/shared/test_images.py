"""Safe photo decoding: formats, EXIF orientation, modes, one clear error per bad input."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import InvalidImageError
from shared.images import (
    as_rgb,
    check_photo,
    content_hash,
    decode_image,
    is_image_name,
    load_image,
    read_bytes,
)

ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels, with a bogus 16-byte IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"\x00" * 16)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decode_formats_to_rgb_of_right_size(fmt: str) -> None:
    source = _noise(40, 24)
    decoded = decode_image(_encode(source, fmt, quality=95), name="photo")
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 24)


def test_png_decodes_losslessly() -> None:
    source = _noise(17, 9, seed=4)
    decoded = decode_image(_encode(source, "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(source))


@pytest.mark.parametrize(
    ("orientation", "top_color", "bottom_color"),
    [(6, "red", "blue"), (8, "blue", "red")],  # 6: rotate 90° clockwise; 8: counter-clockwise
)
def test_exif_orientation_is_applied(orientation: int, top_color: str, bottom_color: str) -> None:
    stored = Image.new("RGB", (64, 32), "blue")
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red, right half blue
    exif = stored.getexif()
    exif[ORIENTATION] = orientation
    decoded = decode_image(_encode(stored, "JPEG", exif=exif, quality=95))
    assert decoded.size == (32, 64)  # upright: width and height swapped
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for (x, y), name in (((16, 8), top_color), ((16, 56), bottom_color)):
        np.testing.assert_allclose(decoded.getpixel((x, y)), colors[name], atol=8)


def test_exif_orientation_1_keeps_size() -> None:
    stored = _noise(30, 20)
    exif = stored.getexif()
    exif[ORIENTATION] = 1
    assert decode_image(_encode(stored, "JPEG", exif=exif)).size == (30, 20)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16"])
def test_other_png_modes_become_rgb(mode: str) -> None:
    source = _noise(12, 10).convert(mode) if mode != "I;16" else Image.new("I;16", (12, 10), 300)
    decoded = decode_image(_encode(source, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.size == (12, 10)


def test_as_rgb_copies_only_what_is_not_rgb() -> None:
    rgb, gray = _noise(8, 6), _noise(8, 6).convert("L")
    assert as_rgb(rgb) is rgb  # convert("RGB") would copy it (2 ms for an 800 x 535 photo)
    converted = as_rgb(gray)
    assert converted.mode == "RGB" and gray.mode == "L"
    np.testing.assert_array_equal(np.asarray(converted)[..., 0], np.asarray(gray))


def test_grayscale_stays_gray() -> None:
    gray = Image.new("L", (5, 5), 77)
    decoded = np.asarray(decode_image(_encode(gray, "PNG")))
    assert (decoded == 77).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(_encode(Image.new("CMYK", (8, 6)), "JPEG"))
    assert decoded.mode == "RGB" and decoded.size == (8, 6)


def _truncated_jpeg() -> bytes:
    data = _encode(_noise(64, 64), "JPEG", quality=90)
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = _encode(_noise(64, 64), "PNG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (np.random.default_rng(5).bytes(2000), "not a readable"),
        (_truncated_jpeg(), "truncated"),
        (_truncated_png(), "truncated"),
        (_encode(_noise(8, 8), "BMP"), "unsupported format BMP"),
        (_encode(_noise(8, 8), "GIF"), "unsupported format GIF"),
        (_encode(_noise(8, 8), "TIFF"), "unsupported format TIFF"),
    ],
    ids=["zero-bytes", "random-bytes", "truncated-jpeg", "truncated-png", "bmp", "gif", "tiff"],
)
def test_bad_bytes_raise_invalid_image_error_naming_the_photo(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason) as info:
        decode_image(data, name="uploads/bad-photo.jpg")
    assert "uploads/bad-photo.jpg" in str(info.value)
    assert info.value.__cause__ is None  # no raw PIL exception chained for callers to see


def test_pixel_cap_boundary() -> None:
    data = _encode(_noise(64, 48), "PNG")
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(InvalidImageError, match="over the limit") as info:
        decode_image(data, name="big.png", max_pixels=64 * 48 - 1)
    assert "big.png" in str(info.value)
    assert "64x48" in str(info.value)


def test_pixel_cap_checked_before_decoding() -> None:
    # The header claims 10000 x 10000 but the pixel data is bogus: had it been decoded first,
    # the error would be "corrupt"; the cap must refuse it from the header alone.
    data = _png_header_only(10_000, 10_000)
    assert len(data) < 100
    with pytest.raises(InvalidImageError, match="over the limit") as info:
        decode_image(data, name="bomb.png", max_pixels=50_000_000)
    assert "bomb.png" in str(info.value)
    assert "PROCROP_MAX_IMAGE_PIXELS" in str(info.value)


def test_header_past_pil_bomb_limit_is_refused() -> None:
    with pytest.raises(InvalidImageError, match="too large") as info:
        decode_image(_png_header_only(20_000, 20_000), name="huge.png")
    assert "huge.png" in str(info.value)


def test_load_image_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "photo.webp"
    path.write_bytes(_encode(_noise(20, 30), "WEBP"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 30)


@pytest.mark.parametrize(
    ("what", "message"), [("missing", "cannot read file"), ("directory", "not a regular file")]
)
def test_load_image_unreadable_path(tmp_path: Path, what: str, message: str) -> None:
    path = tmp_path / "nope.jpg"
    if what == "directory":
        path.mkdir()
    with pytest.raises(InvalidImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_load_image_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_content_hash_is_stable_sha256() -> None:
    data = _encode(_noise(8, 8), "PNG")
    assert content_hash(data) == content_hash(bytes(data)) == hashlib.sha256(data).hexdigest()
    assert len(content_hash(data)) == 64
    assert content_hash(data) != content_hash(data + b"\x00")
    assert content_hash(b"") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.jpg", True), ("b/C.JPEG", True), ("x.png", True), ("y.WebP", True), ("z.gif", False),
     ("jpg", False), ("notes.txt", False)],
)  # fmt: skip
def test_is_image_name(name: str, expected: bool) -> None:
    assert is_image_name(name) is expected


# --- check_photo: the gateway's bounded check ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_check_photo_agrees_with_decode(fmt: str, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = _encode(_noise(64, 40), fmt, exif=exif.tobytes())
    info = check_photo(data, "p", 10_000)
    assert (info.width, info.height) == decode_image(data, "p").size  # upright, as decoded
    assert info.format == fmt


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_check_photo_refuses_truncated_photos(fmt: str) -> None:
    data = _encode(_noise(256, 192), fmt)
    with pytest.raises(InvalidImageError, match=r"^p: "):
        check_photo(data[: len(data) * 2 // 3], "p")


def test_check_photo_refuses_over_the_pixel_cap_and_non_photos() -> None:
    with pytest.raises(InvalidImageError, match="over the limit"):
        check_photo(_encode(_noise(64, 40), "PNG"), "p", 64 * 40 - 1)
    for data in (b"", b"GIF89a" + b"\0" * 64, _encode(_noise(8, 8), "GIF")):
        with pytest.raises(InvalidImageError):
            check_photo(data, "p")


_PEAK_RSS = """
import sys
from pathlib import Path
from shared.images import {fn}
data = Path(sys.argv[1]).read_bytes()
def peak():
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024
before = peak()
{fn}(data, "big")
print(peak() - before)
"""


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_check_photo_memory_does_not_grow_with_pixels(fmt: str, tmp_path: Path) -> None:
    """A 7000 x 7000 photo (147 MB of pixels; 160 KB as a PNG) is checked in a few MB, measured
    as the growth of a fresh process's peak resident memory (PIL's buffers are C memory)."""
    import subprocess
    import sys

    path = tmp_path / "big"
    path.write_bytes(_encode(Image.new("RGB", (7000, 7000), (200, 120, 40)), fmt))

    def growth(fn: str) -> int:
        code = _PEAK_RSS.format(fn=fn)
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                             text=True, check=True, timeout=60)  # fmt: skip
        return int(out.stdout)

    assert growth("check_photo") < 16 * 2**20
    assert growth("decode_image") > 100 * 2**20  # what the gateway paid before


def test_read_bytes_refuses_what_is_not_a_bounded_regular_file(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x" * 100)
    assert read_bytes(photo, max_bytes=100) == b"x" * 100
    with pytest.raises(InvalidImageError, match=r"photo.jpg: 0 MB is over the 0 MB limit"):
        read_bytes(photo, max_bytes=99)
    with pytest.raises(InvalidImageError, match="not a regular file"):
        read_bytes("/dev/zero")  # endless: was read until memory ran out
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(InvalidImageError, match="not a regular file"):
        read_bytes(fifo)  # opening it would block until a writer came
    with pytest.raises(InvalidImageError, match="not a regular file"):
        read_bytes(tmp_path)
    with pytest.raises(InvalidImageError, match="cannot read file"):
        read_bytes(tmp_path / "missing.jpg")


def test_corrupt_exif_is_read_quietly() -> None:
    """PIL warns once per photo with a damaged EXIF block ("Truncated File Read", "Corrupt EXIF
    data"); the photo is read with what could be parsed, and stderr stays for the crops."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "a camera maker"
    data = _encode(_noise(40, 30), "JPEG", exif=exif.tobytes()[:-4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = decode_image(data, "damaged.jpg")
        info = check_photo(data, "damaged.jpg")
    assert [str(w.message) for w in caught] == []
    assert image.size == (40, 30) and (info.width, info.height) == (40, 30)
