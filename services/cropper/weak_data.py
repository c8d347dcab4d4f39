"""Weak-supervision training data: CAD label sources (and human ones) gathered into one training
set, the versioned pseudo-label rounds, and the views and sampling weights they give.

    [weak] sources = ["runs/cad", "s3://procrop/datasets/<job>/"]   # CAD runs (their labels.jsonl)

Every source's photos are linked (local) or downloaded (s3://, once) into one working folder as
`s{i}/<image>` (CAD source i) or `h/<image>` (the [data] section's human annotations), next to
`train.jsonl`, the JSON-lines annotations of all of them with each CAD canvas's original region as
its label (stage 1). A round's pseudo-labels are `{out}/labels/round-{r}.jsonl` in the same
JSON-lines form (so any round is itself a training set), with `round-{r}.json` its statistics.
Boxes in files are pixel xyxy; in views, normalized xyxy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.annotations import load_annotations
from shared.errors import ObjectNotFoundError, ProCropError
from shared.settings import Settings
from shared.storage import ObjectStore

log = logging.getLogger(__name__)
HUMAN = "h"


@dataclass(frozen=True)
class CadImage:
    """A CAD canvas of the training set: its name in the working folder, size in pixels, original
    region (pixel xyxy), source index, and its object key where the crop workers can read it."""

    name: str
    width: int
    height: int
    region: tuple[float, float, float, float]
    source: int
    key: str | None
    photo: str | None  # the professional photo it was made from


@dataclass(frozen=True)
class Assembled:
    annotations: Path  # train.jsonl
    folder: Path
    cad: dict[str, CadImage]  # by name
    source_of: dict[str, str]  # photo name -> "s{i}" or "h"


def source_labels(source: str, settings: Settings) -> tuple[ObjectStore | None, str, str]:
    """A CAD source -> (its store or None for a local one, its prefix or folder, labels text)."""
    if source.startswith("s3://"):
        from shared.checkpoints import open_location

        store, prefix = open_location(source.removesuffix("labels.jsonl"), settings)
        prefix = f"{prefix}/" if prefix else ""
        try:
            return store, prefix, store.get(f"{prefix}labels.jsonl").decode()
        except ObjectNotFoundError:
            raise ProCropError(f"{source}: no labels.jsonl there (a finished CAD run?)") from None
    path = Path(source)
    path = path / "labels.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ProCropError(f"weak.sources: {source} has no labels.jsonl")
    return None, str(path.parent), path.read_text()


def assemble(
    sources: list[str], human: tuple[str, str, str | None] | None, folder: Path, settings: Settings
) -> Assembled:
    """Gather the CAD sources (and `human` = (annotations, format, images) when mixed) into
    `folder`; returns the combined stage-1 annotations and what each photo is."""
    folder.mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, Any]] = []
    cad: dict[str, CadImage] = {}
    for i, source in enumerate(sources):
        store, base, text = source_labels(source, settings)
        for line in (json.loads(t) for t in text.splitlines() if t.strip()):
            name = f"s{i}/{line['image']}"
            _bring(folder / name, store, base, line["image"])
            region = tuple(float(v) for v in line["crops"][0]["box"])
            key = f"{base}{line['image']}" if store is not None else None
            cad[name] = CadImage(name, line["width"], line["height"], region, i, key,  # type: ignore[arg-type]
                                 line.get("photo"))  # fmt: skip
            lines.append({"image": name, "width": line["width"], "height": line["height"],
                          "crops": [line["crops"][0]]})  # fmt: skip
    if human is not None:
        lines += _human_lines(*human, folder)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    source_of = {line["image"]: line["image"].split("/", 1)[0] for line in lines}
    log.info("weak training set: %d CAD canvases, %d human photos", len(cad), len(lines) - len(cad))
    return Assembled(path, folder, cad, source_of)


def _bring(target: Path, store: ObjectStore | None, base: str, image: str) -> None:
    """Link a local source's image into the working folder, or download an s3 one (once)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if store is None:
        os.symlink(Path(base, image).resolve(), target)
        return
    partial = target.with_suffix(".partial")
    partial.write_bytes(store.get(f"{base}{image}"))
    partial.replace(target)


def _human_lines(
    annotations: str, fmt: str, images: str | None, folder: Path
) -> list[dict[str, Any]]:
    """The [data] annotations as JSON lines of `h/<image>` (pixel boxes), images linked in."""
    root = Path(images or Path(annotations).parent)
    lines = []
    for name, photo in sorted(load_annotations(annotations, fmt, image_root=root).items()):
        target = folder / HUMAN / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((root / name).resolve(), target)
        w, h = photo.width, photo.height
        scores = photo.scores or (1.0,) * len(photo.crops_norm)
        crops = [
            {"box": [c[0] * w, c[1] * h, c[2] * w, c[3] * h], "score": s}
            for c, s in zip(photo.crops_norm, scores, strict=True)
        ]
        lines.append({"image": f"{HUMAN}/{name}", "width": w, "height": h, "crops": crops})
    return lines


def sampling_weights(names: list[str], source_of: dict[str, str], weights: dict[str, float]):
    """(N,) draw weight of each training photo: its source's weight (a photo of a source with
    weight 2 is drawn twice as often as one of weight 1), for a `WeightedRandomSampler`."""
    return np.asarray([weights[source_of[n]] for n in names], np.float64)


def round_key(prefix: str, r: int, suffix: str = "jsonl") -> str:
    name = f"labels/round-{r}.{suffix}"
    return f"{prefix}/{name}" if prefix else name


def write_round(
    store: ObjectStore, prefix: str, r: int, labels: dict[str, tuple[np.ndarray, np.ndarray]], cad: dict[str, CadImage],
    stats: dict[str, Any],
) -> None:  # fmt: skip
    """Round `r`'s pseudo-labels (pixel xyxy and scores per canvas) and statistics; the JSON
    lines first, so a round whose statistics exist is complete."""
    lines = []
    for name in sorted(labels):
        boxes, scores = labels[name]
        image = cad[name]
        crops = [{"box": [round(float(v), 2) for v in b], "score": round(float(s), 4)}
                 for b, s in zip(boxes, scores, strict=True)]  # fmt: skip
        lines.append(json.dumps({"image": name, "width": image.width, "height": image.height,
                                 "crops": crops, "region": list(image.region),
                                 "photo": image.photo}, sort_keys=True))  # fmt: skip
    store.put(
        round_key(prefix, r), "".join(s + "\n" for s in lines).encode(), "application/x-ndjson"
    )
    store.put(
        round_key(prefix, r, "json"), json.dumps(stats, indent=1).encode(), "application/json"
    )


def read_round(
    store: ObjectStore, prefix: str, r: int
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Round `r`'s pseudo-labels if the round was completed, else None."""
    if not store.exists(round_key(prefix, r, "json")):
        return None
    out = {}
    for line in store.get(round_key(prefix, r)).decode().splitlines():
        item = json.loads(line)
        boxes = np.asarray([c["box"] for c in item["crops"]], np.float64).reshape(-1, 4)
        out[item["image"]] = (boxes, np.asarray([c["score"] for c in item["crops"]], np.float64))
    return out


def relabel_views(views: Any, index: list[int], labels: list[np.ndarray]) -> Any:
    """Stage-1 views (their crops[i][v][0] is the canvas's original region in view v) with the
    canvases `index` relabelled: labels[j] (M, 4) normalized xyxy in the whole canvas, mapped into
    each view's window (recovered from where the region lies in it), mirrored with the view and
    clipped to it. A label that leaves the window keeps its part inside (pseudo-labels overlap the
    region by IoU > 0.8, and every window contains the region, so little is cut)."""
    from shared.boxes import flip_xyxy

    crops = [list(row) for row in views.crops]
    for i, boxes in zip(index, labels, strict=True):
        region = _unit_region(crops[i][0])
        for v in range(views.count):
            seen = crops[i][v][:1]
            seen = flip_xyxy(seen) if views.flipped[i, v] else seen  # in the unmirrored view
            scale = (region[2:] - region[:2]) / (seen[0, 2:] - seen[0, :2])  # window w, h
            origin = region[:2] - seen[0, :2] * scale
            mapped = np.clip((boxes - np.tile(origin, 2)) / np.tile(scale, 2), 0.0, 1.0)
            crops[i][v] = flip_xyxy(mapped) if views.flipped[i, v] else mapped
    return dataclasses.replace(views, crops=crops)


def _unit_region(view0: np.ndarray) -> np.ndarray:
    """View 0 is the whole canvas, unmirrored: its first crop is the region in the canvas."""
    return np.asarray(view0[0], np.float64)
