"""A CAD run: its parameters, one item's processing, and the run's closing documents.

The same functions serve `procrop cad` (every item in this process, `run_embedded`) and the
workers (`services/outpainter/worker.py`: one task chain per item, a planner that keeps a bounded
number in flight). A run writes under its prefix:

    run.json         parameters, seed, model ids and versions, code version
    items/{item}/    each item's objects (services/outpainter/pipeline.py)
    manifest.jsonl   one line per (photo, variant): slot, photo, variant, item, status, reasons
    labels.jsonl     the accepted items in `procrop train`'s JSON-lines format (image paths are
                     relative to the run's prefix, so `--images` is the run's folder)
    report.json      the counts: planned, accepted, rejected (by reason), failed, duplicate...
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.outpainter.pipeline import (
    Pipeline,
    describe_item,
    failed_record,
    item_id,
    item_key,
    item_record,
    label_line,
    read_photo,
    write_filled,
    write_record,
)
from services.retriever.sources import PhotoRef, list_photos
from shared.errors import InvalidImageError, ObjectNotFoundError, ProCropError, one_line
from shared.runs import slot_id
from shared.settings import CadSettings, Settings
from shared.storage import ObjectStore

log = logging.getLogger(__name__)
ITEM_ERRORS = (InvalidImageError, ObjectNotFoundError, ValueError)  # the item fails, not the run


@dataclass(frozen=True)
class RunParams:
    source: str
    variants: int = 3
    seed: int = 0
    limit: int | None = None  # photos (each gives `variants` items)
    profile: str = "lite"

    def check(self, settings: Settings) -> None:
        cad = settings.cad
        if not 1 <= self.variants <= cad.max_variants:
            raise ProCropError(f"variants: give 1 to {cad.max_variants}, got {self.variants}")
        if self.limit is not None and self.limit < 1:
            raise ProCropError(f"limit: give at least 1 photo, got {self.limit}")
        if not 0 <= self.seed < 2**63:
            raise ProCropError(f"seed: give 0 to 2**63 - 1, got {self.seed}")
        if self.limit is not None and self.limit * self.variants > cad.max_items:
            raise ProCropError(f"a run may have at most {cad.max_items:,} items")


def code_version() -> str:
    """The package version and, in a checkout, its git commit."""
    from importlib.metadata import version

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"procrop {version('procrop')}" + (f" ({commit})" if commit else "")


def run_document(
    run: str, params: RunParams, cad: CadSettings, models: dict[str, str] | None = None
) -> dict[str, Any]:
    """run.json: parameters, settings, code version and, where one process makes every item,
    the versions of its models."""
    document = {
        "run": run,
        "params": asdict(params),
        "cad": cad.model_dump(mode="json", exclude={"chat_api_key"}),
        "code": code_version(),
    }
    return document if models is None else {**document, "models": models}


def process_item(
    pipeline: Pipeline,
    store: ObjectStore,
    prefix: str,
    settings: Settings,
    photo: PhotoRef,
    variant: int,
    seed: int,
    data: bytes | None = None,
) -> dict[str, Any]:
    """Make one item in this process (both stages); returns its manifest line. A finished item
    (its item.json exists) is not made again; a bad photo gives a `failed` line."""
    slot = slot_id(photo.name, variant)
    try:
        data = photo.read() if data is None else data
        image, sha = read_photo(data, photo.uri, settings)
        item = item_id(sha, variant)
        done = _finished_record(store, prefix, item)
        if done is not None:  # made before: by this slot (a resumed run) or a byte-identical photo
            return manifest_line(slot, {**done, "photo": photo.name, "variant": variant})
        described = describe_item(pipeline, store, prefix, item, image, sha, variant, seed)
        filled = pipeline.fill(image, described, sha, variant, seed)
        record = item_record(item, photo.name, sha, variant, described, filled)
        write_filled(store, prefix, item, filled, record)
    except ITEM_ERRORS as exc:
        record = failed_record(slot, photo.name, variant, one_line(exc))
    return manifest_line(slot, record)


def _finished_record(store: ObjectStore, prefix: str, item: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(store.get(item_key(prefix, item, "item.json")))
    except ObjectNotFoundError:
        return None
    return record


def manifest_line(slot: str, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "slot": slot,
        "photo": record["photo"],
        "variant": record["variant"],
        "item": record.get("item"),
        "status": record["status"],
        "reasons": record.get("reasons", []),
    }


def finalize(store: ObjectStore, prefix: str, lines: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write manifest.jsonl, labels.jsonl and report.json from the manifest lines; returns the
    report. Labels come from the accepted items' records, one line per item."""
    ordered = sorted(lines, key=lambda line: (line["photo"], line["variant"]))
    statuses = Counter(line["status"] for line in ordered)
    reasons = Counter(
        r for line in ordered if line["status"] == "rejected" for r in line["reasons"]
    )
    labels = []
    for line in ordered:
        if line["status"] == "accepted":
            record = json.loads(store.get(item_key(prefix, line["item"], "item.json")))
            labels.append(label_line(record))
    manifest = "".join(json.dumps(line, sort_keys=True) + "\n" for line in ordered)
    store.put(f"{prefix}manifest.jsonl", manifest.encode(), "application/x-ndjson")
    store.put(
        f"{prefix}labels.jsonl", "".join(s + "\n" for s in labels).encode(), "application/x-ndjson"
    )
    planned = len(ordered)
    report = {
        "items": planned,
        **{
            s: statuses.get(s, 0)
            for s in ("accepted", "rejected", "failed", "duplicate", "cancelled")
        },
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejection_rate": round(
            statuses.get("rejected", 0) / max(1, planned - statuses.get("failed", 0)), 4
        ),
        "manifest": f"{prefix}manifest.jsonl",
        "labels": f"{prefix}labels.jsonl",
    }
    store.put(f"{prefix}report.json", json.dumps(report, indent=1).encode(), "application/json")
    return report


def run_embedded(
    params: RunParams,
    pipeline: Pipeline,
    store: ObjectStore,
    settings: Settings,
    prefix: str = "",
    run: str = "cad",
    on_item: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The whole run in this process, photo after photo; returns the report. Run again with
    the same output and parameters, it resumes: finished items are read back, not made again."""
    params.check(settings)
    photos = list_photos(params.source, settings)
    if not photos:
        raise ProCropError(f"{params.source}: no JPEG, PNG or WebP photos found")
    if params.limit is not None:
        photos = photos[: params.limit]
    document = run_document(run, params, pipeline.cad, pipeline.versions())
    _write_run_document(store, prefix, document)
    if on_start is not None:
        on_start(len(photos) * params.variants)
    lines: list[dict[str, Any]] = []
    owners: dict[str | None, str] = {}  # item -> slot: byte-identical photos make one item
    for photo in photos:
        try:
            data: bytes | None = photo.read()
        except ITEM_ERRORS:
            data = None
        for variant in range(params.variants):
            if data is None:
                slot = slot_id(photo.name, variant)
                line = manifest_line(
                    slot, failed_record(slot, photo.name, variant, f"{photo.uri}: cannot read")
                )
            else:
                line = process_item(
                    pipeline, store, prefix, settings, photo, variant, params.seed, data
                )
                owner = (
                    owners.setdefault(line["item"], line["slot"]) if line["item"] else line["slot"]
                )
                if owner != line["slot"] and line["status"] != "failed":
                    line = {
                        **line,
                        "status": "duplicate",
                        "reasons": [f"same photo as slot {owner}"],
                    }
            lines.append(line)
            if on_item is not None:
                on_item(line)
    return finalize(store, prefix, lines)


def _write_run_document(store: ObjectStore, prefix: str, document: dict[str, Any]) -> None:
    """run.json; a resumed run must keep its parameters (the items already made depend on them)."""
    key = f"{prefix}run.json"
    try:
        existing = json.loads(store.get(key))
    except ObjectNotFoundError:
        existing = None
    if existing is not None and (existing["params"], existing["cad"]) != (
        document["params"],
        document["cad"],
    ):
        raise ProCropError(
            f"{store.uri(key)}: this output holds a run with other parameters; "
            "resume it with the same ones or choose another output"
        )
    store.put(key, json.dumps(document, indent=1, sort_keys=True).encode(), "application/json")


__all__ = [
    "RunParams",
    "finalize",
    "manifest_line",
    "process_item",
    "run_document",
    "run_embedded",
    "write_record",
]
