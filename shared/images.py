"""Safe photo loading: bytes or a path -> an RGB PIL image, upright, within a pixel cap.

Every failure (empty, corrupt, truncated, unsupported format, too many pixels) raises
`InvalidImageError` naming the photo, so callers never see a raw PIL exception.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import InvalidImageError

SUPPORTED_FORMATS = frozenset(
    {"JPEG", "PNG", "WEBP", "MPO"}
)  # MPO: multi-picture JPEG from cameras
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def content_hash(data: bytes) -> str:
    """sha256 hex digest of a photo's bytes: its identity in collections and object keys."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str | Path) -> bytes:
    """Read a photo file, turning I/O failures into `InvalidImageError`."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image) or image
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Read only the header, then check format and size before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
