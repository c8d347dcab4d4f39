"""Crop annotation files, read into one form: photo path -> normalized xyxy crops, best first.

Three formats (`load_annotations` picks one by name or by the path's shape):

- FCDB (`annotations.json`): a list of `{"image", "width", "height", "crop_xywh": [x, y, w, h]}` in
  pixels, one expert crop per photo (`scores` is None). A few FCDB crops run a pixel or two past the
  photo: they are clipped. A few others (32 of the 1,369 training photos) lie far outside their
  photo, in the coordinates of a larger original we do not have: those records are skipped and
  logged, not guessed at.
- JSON lines (`*.jsonl`), one photo a line:
  `{"image": PATH, "crops": [{"box": [x1, y1, x2, y2], "score": S}, ...], "width": W, "height": H}`
  with pixel xyxy boxes; `score` defaults to 1.0 (higher is better); `width` / `height` may both be
  left out, and are then read from the image file's header.
- GAICD (Zeng et al., "Grid Anchor based Image Cropping"): a folder of per-photo `.txt` files,
  one candidate crop a line as `y1 x1 y2 x2 MOS` in pixels (rows first, then columns). The order is
  the one both reference loaders read: `croppingDataset.py` in
  HuiZeng/Grid-Anchor-based-Image-Cropping-Pytorch (`xmin = annotation[1]`,
  `ymin = annotation[0]`, `xmax = annotation[3]`, `ymax = annotation[2]`, MOS last) and
  `dataset/cropping_dataset.py` in bo-zhang-cs/GAIC-Pytorch (`y1, x1, y2, x2 = values[0:4]`).
  Lines whose MOS is -2, GAICD's mark for an unusable candidate, are dropped there and here.

Sizes read from an image header are the stored pixel size, before any EXIF rotation: annotation
boxes are taken to be in the same stored frame. In every format a crop running at most 1 % of the
side past the photo is clipped, one further out is skipped and logged, and a photo left with no
crop is skipped and logged. Keys of the returned dicts are image paths relative to the image root
(posix), as the retrieval sources name photos.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shared.boxes import clip_xyxy, normalize_xyxy, xywh_to_xyxy
from shared.errors import ProCropError

log = logging.getLogger(__name__)
OVERRUN_TOLERANCE = 0.01  # crops may run this far (of the side) past the photo, and are clipped
ANNOTATION_FORMATS = ("auto", "fcdb", "gaicd", "jsonl")  # the choices of `load_annotations(fmt=)`
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # tried in this order for a GAICD annotation's photo
GAICD_INVALID_MOS = -2.0  # GAICD's MOS for a candidate the raters could not use

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class AnnotatedPhoto:
    """A photo's path, its size in pixels, and its crops as normalized xyxy boxes, best first.

    `scores` holds one score per crop (higher is better, same order as `crops_norm`), or None when
    the format gives a single unscored crop (FCDB).
    """

    image: str
    width: int
    height: int
    crops_norm: tuple[Box, ...]
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.scores is not None and len(self.scores) != len(self.crops_norm):
            raise ValueError(
                f"{self.image}: {len(self.scores)} scores for {len(self.crops_norm)} crops"
            )


_Parsed = tuple[str, AnnotatedPhoto | None, int]  # key, photo (None: no crop left), crops skipped


def load_annotations(
    path: str | Path, fmt: str = "auto", image_root: str | Path | None = None
) -> dict[str, AnnotatedPhoto]:
    """Read crop annotations in any of `ANNOTATION_FORMATS` into photo path -> `AnnotatedPhoto`.

    `fmt="auto"` reads a folder as GAICD, a `.jsonl` file as JSON lines, a `.json` file as FCDB.
    `image_root` is passed to the GAICD and JSON-lines loaders; FCDB names are relative to the
    annotation file's folder and need no image, so FCDB ignores it.
    """
    if fmt not in ANNOTATION_FORMATS:
        choices = ", ".join(ANNOTATION_FORMATS)
        raise ProCropError(f"unknown annotation format {fmt!r}: choose one of {choices}")
    if fmt == "auto":
        fmt = _detect_format(Path(path))
    if fmt == "fcdb":
        return load_fcdb(path)
    loader = load_gaicd if fmt == "gaicd" else load_jsonl
    return loader(path, image_root)


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "gaicd"
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    if path.suffix.lower() == ".json":
        return "fcdb"
    raise ProCropError(
        f"{path}: cannot tell the annotation format (a folder is gaicd, *.jsonl is jsonl, "
        "*.json is fcdb); name it with fmt="
    )


# What malformed JSON can raise while it is parsed and read: also OverflowError (1e400 is
# infinity, and int() of it or float() of a 400-digit integer fails) and RecursionError (arrays
# nested 100,000 deep).
MALFORMED = (OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError)


def load_fcdb(path: str | Path) -> dict[str, AnnotatedPhoto]:
    """Read an FCDB-format annotation file; raise `ProCropError` naming the file if malformed."""
    try:
        records = json.loads(Path(path).read_text())
        photos = [_fcdb_record(r) for r in records]
    except MALFORMED as exc:
        raise ProCropError(f"{path}: not an FCDB annotation file ({exc})") from None
    inside = [p for p in photos if p is not None]
    if len(inside) < len(photos):
        log.warning(
            "%s: skipped %d crops that lie outside their photo", path, len(photos) - len(inside)
        )
    valid = {p.image: p for p in inside}
    if len(valid) < len(inside):
        log.warning("%s: %d photos listed twice, the last kept", path, len(inside) - len(valid))
    return valid


def _fcdb_record(record: dict) -> AnnotatedPhoto | None:
    width, height = int(record["width"]), int(record["height"])
    if width <= 0 or height <= 0:
        raise ValueError(f"bad size {width}x{height} for {record['image']}")
    box = xywh_to_xyxy(np.asarray(record["crop_xywh"], np.float64))
    crop = _normalized_crop(box, width, height, str(record["image"]))
    return None if crop is None else AnnotatedPhoto(str(record["image"]), width, height, (crop,))


def load_jsonl(path: str | Path, image_root: str | Path | None = None) -> dict[str, AnnotatedPhoto]:
    """Read JSON-lines crop annotations (pixel xyxy boxes, optional scores) into normalized xyxy.

    Image paths are relative to `image_root` (default: the JSONL file's folder); the header of the
    image is read only for a line without `width` / `height`. Raise `ProCropError` naming the file
    and line for a malformed line, an unreadable image, or a photo listed twice.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProCropError(f"{path}: cannot read JSON-lines annotations ({exc})") from None
    parsed: list[_Parsed] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _jsonl_photo(json.loads(line), root)
        except KeyError as exc:
            raise ProCropError(f"{path}:{number}: missing key {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise ProCropError(f"{path}:{number}: {exc}") from None
        if item[0] in first_line:
            raise ProCropError(
                f"{path}:{number}: {item[0]} is already listed on line {first_line[item[0]]}"
            )
        first_line[item[0]] = number
        parsed.append(item)
    return _collect(path, parsed)


def _jsonl_photo(record: object, root: Path) -> _Parsed:
    """One JSON-lines record -> (key, photo or None, crops skipped); ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    image, crops = record["image"], record["crops"]
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be a non-empty path")
    if not isinstance(crops, list):
        raise ValueError("'crops' must be a list")
    key = _relative_key(image, root)
    width, height = _jsonl_size(record, root / image)
    found = _Crops(key, width, height)
    for i, crop in enumerate(crops):
        if not isinstance(crop, dict):
            raise ValueError(f"crop {i} must be a JSON object")
        box = [_number(v, f"crop {i} box") for v in _sequence(crop["box"], 4, f"crop {i} box")]
        found.add(box, _number(crop.get("score", 1.0), f"crop {i} score"))
    return found.parsed()


def _jsonl_size(record: dict, image: Path) -> tuple[int, int]:
    """(width, height) from the record, or from the image header when the record has neither."""
    if "width" not in record and "height" not in record:
        return _header_size(image)
    width, height = _number(record["width"], "width"), _number(record["height"], "height")
    if width <= 0 or height <= 0 or not width.is_integer() or not height.is_integer():
        raise ValueError(f"bad size {record['width']}x{record['height']}")
    return int(width), int(height)


def load_gaicd(path: str | Path, image_root: str | Path | None = None) -> dict[str, AnnotatedPhoto]:
    """Read a folder of GAICD `.txt` files (`y1 x1 y2 x2 MOS` pixel lines) into normalized xyxy.

    Every usable candidate is kept, sorted by MOS best first, with its MOS in `scores`. The photo of
    `NAME.txt` is `NAME.jpg` (or `.jpeg`, `.png`) in an image root or one folder below it; the
    default roots, tried in order, are a sibling `images` folder (GAICD's `annotations/` next to
    `images/train/`, `images/test/`; keys are then `train/NAME.jpg`), `../images/<folder name>`
    (the older `annotations/train/` next to `images/train/`), and the annotation folder itself.
    Raise `ProCropError` naming the file (and line) for a malformed line or a photo not found.
    """
    folder = Path(path)
    notes = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not notes:
        raise ProCropError(f"{folder}: not a folder of GAICD .txt annotation files")
    if image_root is not None:
        roots = [Path(image_root)]
    else:
        roots = [folder.parent / "images", folder.parent.parent / "images" / folder.name, folder]
    images = _image_index(roots)
    return _collect(folder, [_gaicd_photo(note, images, roots) for note in notes])


def _image_index(roots: list[Path]) -> dict[tuple[str, str], tuple[Path, str]]:
    """(stem, lower-case suffix) -> (file, key relative to its root) for the photos in `roots`.

    Each root and its immediate subfolders are listed; the first root (then depth) to hold a name
    wins.
    """
    index: dict[tuple[str, str], tuple[Path, str]] = {}
    for root in (r for r in roots if r.is_dir()):
        entries = sorted(root.iterdir())
        files = [p for p in entries if p.is_file()]
        files += [p for d in entries if d.is_dir() for p in sorted(d.iterdir()) if p.is_file()]
        for file in files:
            if file.suffix.lower() in IMAGE_SUFFIXES:
                item = (file, file.relative_to(root).as_posix())
                index.setdefault((file.stem, file.suffix.lower()), item)
    return index


def _gaicd_photo(
    note: Path, images: dict[tuple[str, str], tuple[Path, str]], roots: list[Path]
) -> _Parsed:
    """One GAICD `.txt` file -> (key, photo or None, crops skipped)."""
    found = next((images[k] for k in ((note.stem, s) for s in IMAGE_SUFFIXES) if k in images), None)
    if found is None:
        where = ", ".join(str(r) for r in roots)
        raise ProCropError(f"{note}: no photo {note.stem}.jpg/.jpeg/.png under {where}")
    file, key = found
    try:
        width, height = _header_size(file)
        lines = note.read_text().splitlines()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProCropError(f"{note}: {exc}") from None
    crops = _Crops(key, width, height)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            box, mos = _gaicd_line(line)
            if mos != GAICD_INVALID_MOS:
                crops.add(box, mos)
        except ValueError as exc:
            raise ProCropError(f"{note}:{number}: {exc}") from None
    return crops.parsed()


def _gaicd_line(line: str) -> tuple[list[float], float]:
    """`y1 x1 y2 x2 MOS` -> (pixel xyxy box, MOS); ValueError if it is not five finite numbers."""
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"expected 'y1 x1 y2 x2 MOS', got {line.strip()!r}")
    y1, x1, y2, x2, mos = (float(f) for f in fields)
    if not math.isfinite(mos):
        raise ValueError(f"MOS {mos} is not a finite number")
    return [x1, y1, x2, y2], mos


def _normalized_crop(
    box_px: Sequence[float] | np.ndarray, width: int, height: int, image: str
) -> Box | None:
    """Pixel xyxy -> normalized xyxy rounded to 1e-6, clipped when it runs at most
    `OVERRUN_TOLERANCE` past the photo; None when further out; ValueError if empty or not finite.
    """
    box = normalize_xyxy(np.asarray(box_px, np.float64), width, height)
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"bad crop {list(box_px)} for {image}")
    if box.min() < -OVERRUN_TOLERANCE or box.max() > 1 + OVERRUN_TOLERANCE:
        return None
    box = clip_xyxy(box, 1.0, 1.0)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"empty crop for {image}")
    x1, y1, x2, y2 = (round(float(v), 6) for v in box)
    return x1, y1, x2, y2


class _Crops:
    """A photo's crops as they are read: normalized, those far outside the photo counted apart."""

    def __init__(self, key: str, width: int, height: int) -> None:
        self.key, self.width, self.height = key, width, height
        self.boxes: list[Box] = []
        self.scores: list[float] = []
        self.skipped = 0

    def add(self, box_px: Sequence[float], score: float) -> None:
        """Add a pixel xyxy crop; ValueError if it is empty or not finite."""
        crop = _normalized_crop(box_px, self.width, self.height, self.key)
        if crop is None:
            self.skipped += 1
            return
        self.boxes.append(crop)
        self.scores.append(score)

    def parsed(self) -> _Parsed:
        """(key, photo or None, crops skipped)."""
        photo = _ranked(self.key, self.width, self.height, self.boxes, self.scores)
        return self.key, photo, self.skipped


def _ranked(
    image: str, width: int, height: int, crops: list[Box], scores: list[float]
) -> AnnotatedPhoto | None:
    """A photo with its crops sorted by score, best first (ties keep file order); None if none."""
    if not crops:
        return None
    order = sorted(range(len(crops)), key=lambda i: -scores[i])
    ranked_crops = tuple(crops[i] for i in order)
    return AnnotatedPhoto(image, width, height, ranked_crops, tuple(scores[i] for i in order))


def _collect(path: Path, parsed: list[_Parsed]) -> dict[str, AnnotatedPhoto]:
    """Keep the photos that have a crop; log how many crops and photos were skipped."""
    crops_skipped = sum(skipped for _, _, skipped in parsed)
    if crops_skipped:
        log.warning("%s: skipped %d crops that lie outside their photo", path, crops_skipped)
    photos = {key: photo for key, photo, _ in parsed if photo is not None}
    if len(photos) < len(parsed):
        log.warning("%s: skipped %d photos left with no crop", path, len(parsed) - len(photos))
    return photos


def _header_size(image: Path) -> tuple[int, int]:
    """(width, height) in stored pixels from the image file's header (no EXIF rotation)."""
    try:
        with Image.open(image) as opened:
            return opened.size
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read the size of {image} ({exc})") from None


def _relative_key(image: str, root: Path) -> str:
    """`image` as a posix path relative to `root` (an absolute path outside `root` is kept)."""
    path = Path(image)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _sequence(value: object, length: int, what: str) -> list:
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"{what} must be a list of {length} numbers, got {value!r}")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def fixed_split(
    names: list[str], n_val: int = 200, seed: int = 2026
) -> tuple[list[str], list[str]]:
    """Split photo names into (train, val) the same way on every machine: sort, then shuffle by seed."""
    ordered = sorted(names)
    order = np.random.default_rng(seed).permutation(len(ordered))
    val = sorted(ordered[i] for i in order[:n_val])
    train = sorted(ordered[i] for i in order[n_val:])
    return train, val
