"""What a crop request may ask for, checked the same way at every edge (CLI, gateway, workers):
how many crops (`n`) and which aspect ratios ("W:H", from 1:10 to 10:1). Pure Python: the gateway
imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from shared.errors import shorten

MAX_CROPS = 100  # most crops per photo (per ratio) a request may ask for
MAX_ASPECT_RATIOS = 16  # most ratios one request may ask for
# Ratios from 1:10 to 10:1: past that a crop of a photo is a strip of a few pixels (100000:1 gave
# 800 x 1 px), and float ratios of 1e17 overflow the crop stage's integer rounding.
MIN_RATIO, MAX_RATIO = 0.1, 10.0
MAX_RATIO_CHARS = 32  # "W:H" text longer than this is refused before it is parsed

AspectRatio = tuple[int, int] | float
# Unsigned decimal in ASCII digits (\d would take "١٦" or "１６" and echo them back as the
# label): no sign, exponent, inf or nan.
_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
RATIO_PATTERN = rf"^ *{_NUMBER} *: *{_NUMBER} *$"  # the syntax (spaces only); the range apart
_RATIO_PATTERN = re.compile(RATIO_PATTERN)


def parse_aspect_ratio(text: str) -> AspectRatio:
    """Parse "W:H" into (W, H) when both are integers ("16:9"), else into the float W / H.

    Accepts positive unsigned decimals ("1.91:1", "4:3.5") with optional spaces around the
    colon. The tuple is not reduced ("32:18" stays (32, 18)).

    Raises:
        ValueError: naming `text` (cut to `MAX_RATIO_CHARS`), for anything else ("abc", "0:1",
            "-1:2", "1:", "1:2:3", "inf:1"), and for ratios outside 1:10 to 10:1 ("11:1").
    """
    match = _RATIO_PATTERN.fullmatch(text) if len(text) <= MAX_RATIO_CHARS else None
    if match is None:
        raise ValueError(
            f"aspect ratio must be 'W:H' with positive numbers, e.g. '16:9' or '1.91:1'; "
            f"got {shorten(text)!r}"
        )
    w_text, h_text = match.groups()
    w, h = float(w_text), float(h_text)
    if w <= 0 or h <= 0:
        raise ValueError(f"aspect ratio sides must be positive; got {text!r}")
    if not MIN_RATIO <= w / h <= MAX_RATIO:
        raise ValueError(f"aspect ratio must be between 1:10 and 10:1; got {text!r}")
    if w_text.isdigit() and h_text.isdigit():
        return int(w_text), int(h_text)
    return w / h


def ratio_value(ratio: AspectRatio | tuple[float, float]) -> float:
    """Width over height of a ratio given as W / H or as (W, H); must be positive and finite."""
    if isinstance(ratio, tuple) and not (ratio[0] > 0 and ratio[1] > 0):
        raise ValueError(f"aspect ratio sides must be positive; got {ratio}")
    value = ratio[0] / ratio[1] if isinstance(ratio, tuple) else float(ratio)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"aspect ratio must be positive and finite; got {ratio}")
    return value


def check_crop_request(n: int, aspect_ratios: Sequence[str]) -> None:
    """Raise ValueError, naming the argument, for a bad `n` or a malformed aspect ratio."""
    if not 1 <= n <= MAX_CROPS:
        raise ValueError(f"n must be between 1 and {MAX_CROPS}, got {n}")
    if len(aspect_ratios) > MAX_ASPECT_RATIOS:
        raise ValueError(
            f"at most {MAX_ASPECT_RATIOS} aspect ratios per request, got {len(aspect_ratios)}"
        )
    seen: dict[float, str] = {}
    for text in aspect_ratios:
        parsed = parse_aspect_ratio(text)
        value = round(ratio_value(parsed), 9)
        if value in seen:  # "16:9" twice, or "32:18": the same crops twice, under two labels
            raise ValueError(f"aspect ratios {seen[value]!r} and {text!r} are the same ratio")
        seen[value] = text
