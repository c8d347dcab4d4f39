"""Safe photo loading: bytes or a path -> an RGB PIL image, upright, within a pixel cap.

Every failure (empty, corrupt, truncated, unsupported format, too many pixels) raises
`InvalidImageError` naming the photo, so callers never see a raw PIL exception.

`check_photo` is the bounded check the gateway runs instead of a decode: the header (format, size,
pixel cap), then a verification whose memory does not grow with the photo's pixels (a JPEG is
decoded at 1/8 scale in grey, a PNG's chunks are read to IEND with their CRCs, a WebP's RIFF size
must match its bytes). A 160 KB PNG of 7000 x 7000 costs it about 1 MB, not the 147 MB of a full
decode; workers decode in full (`decode_image`).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InvalidImageError

SUPPORTED_FORMATS = frozenset(
    {"JPEG", "PNG", "WEBP", "MPO"}
)  # MPO: multi-picture JPEG from cameras
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Files read as photos: far above any photo within the pixel cap (50 MP as an RGBA PNG without
# compression is 200 MB), far below what would exhaust a worker's memory.
MAX_FILE_BYTES = 256 * 2**20


def content_hash(data: bytes) -> str:
    """sha256 hex digest of a photo's bytes: its identity in collections and object keys."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a photo file, turning I/O failures into `InvalidImageError`. Only regular files (a
    FIFO would block, /dev/zero never ends) of at most `max_bytes` are read."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImageError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise InvalidImageError(
                f"{path}: {_mb(info.st_size)} is over the {_mb(max_bytes)} limit"
            )
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)  # the file may have grown since
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise InvalidImageError(f"{path}: over the {_mb(max_bytes)} limit")
    return data


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def decode_image(
    data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode photo bytes into an upright RGB image.

    Args:
        data: the encoded file (JPEG, PNG or WebP).
        name: how the photo is named in error messages (a path or an object key).
        max_pixels: refuse images with more pixels than this, before decoding them.
    Returns:
        a fully loaded RGB `PIL.Image.Image`, EXIF orientation applied.
    """
    if not data:
        raise InvalidImageError(f"{name}: empty file (0 bytes)")
    image = _open_checked(data, name, max_pixels)
    try:
        with _quiet_pil():
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # without in_place: a copy (2 ms)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return as_rgb(image)


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` itself when it is RGB (PIL's `convert("RGB")` copies it even then), else its
    RGB conversion."""
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class PhotoInfo:
    """What `check_photo` learns without decoding: the format and the upright size in pixels."""

    format: str  # "JPEG", "MPO", "PNG" or "WEBP"
    width: int
    height: int


_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def check_photo(
    data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> PhotoInfo:
    """Check photo bytes with bounded memory (see the module); InvalidImageError as `decode_image`.

    Catches what the header, the JPEG entropy stream, the PNG chunk structure and the WebP
    container show (wrong format, truncation, bad CRCs); a PNG whose compressed pixels are corrupt
    behind valid CRCs passes, and fails its job in the worker's full decode.
    """
    if not data:
        raise InvalidImageError(f"{name}: empty file (0 bytes)")
    image = _open_checked(data, name, max_pixels)
    fmt, (width, height) = str(image.format), image.size
    try:
        with _quiet_pil():
            rotated = _orientation(image) in _ROTATED
        if fmt in ("JPEG", "MPO"):
            image.draft("L", (max(1, width // 8), max(1, height // 8)))  # DCT scaling: 1/8 side
            image.load()
        elif fmt == "PNG":  # chunk lengths and CRCs up to IEND; the pixels stay compressed
            with Image.open(io.BytesIO(data)) as fresh:  # verify() must come first after open
                fresh.verify()
        elif int.from_bytes(data[4:8], "little") + 8 != len(data):  # WebP: RIFF size
            raise ValueError(f"RIFF size {int.from_bytes(data[4:8], 'little') + 8} != {len(data)}")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return PhotoInfo(fmt, height, width) if rotated else PhotoInfo(fmt, width, height)


@contextmanager
def _quiet_pil() -> Iterator[None]:
    """No PIL warnings on stderr: the pixel cap is ours (`max_pixels`), and a photo whose EXIF is
    corrupt ("Corrupt EXIF data", "tag 274 had too many entries") is read with what PIL could
    parse, as every viewer does; a line per photo only buried the crops."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) from the header; a PNG's `getexif()` would decode the pixels to
    look past IDAT, so a PNG's comes from an eXIf chunk before its pixels only."""
    if image.format != "PNG":
        return int(image.getexif().get(0x0112, 1))
    exif = Image.Exif()
    if image.info.get("exif"):
        exif.load(image.info["exif"])
    return int(exif.get(0x0112, 1))


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Read only the header, then check format and size before any pixel is decoded."""
    try:
        with _quiet_pil():
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InvalidImageError(f"{name}: image too large (decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidImageError(f"{name}: not a readable JPEG, PNG or WebP image") from None
    if image.format not in SUPPORTED_FORMATS:
        raise InvalidImageError(f"{name}: unsupported format {image.format}; use JPEG, PNG or WebP")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: invalid size {width}x{height}")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (PROCROP_MAX_IMAGE_PIXELS)"
        )
    return image


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode a photo file; see `decode_image`."""
    return decode_image(read_bytes(path), name=str(path), max_pixels=max_pixels)


def is_image_name(name: str) -> bool:
    """Whether a file or key name looks like a photo we index (by suffix; content is checked later)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES
