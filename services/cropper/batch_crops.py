"""Batch prediction on the crop workers: the pseudo-label rounds of weak training.

A round's canvases are cut into parts of `weak.batch_size`; each part is one `procrop.crop.batch`
task on the `crop` queue with a message of object keys only:

    {"model": "s3://procrop/runs/w/last", "revision": 3, "profile": "lite", "collection": "...",
     "keys": ["datasets/<job>/items/<item>/image.jpg", ...], "n": 24,
     "out": "runs/w/labels/round-1/parts/00000.jsonl"}

The worker loads that checkpoint with its composition retrieval (cached per model and revision),
crops every photo through `CropPredictor.crop` as a round asks (`pseudo_labels.round_request`:
the model's raw proposals), and writes one JSON line per key
({"key", "width", "height", "crops": [{"box": pixel xyxy, "score"}]}) to `out` in the bucket. The
output key derives from the round and part, so a redelivered task rewrites the same object, and a
resumed round sends only the parts not written yet. The trainer waits for every part.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import numpy as np

from shared.errors import ProCropError
from shared.queue import CROP_BATCH, create_app

log = logging.getLogger(__name__)


def crop_keys(message: dict[str, Any], store: Any, settings: Any) -> str:
    """Worker side: crop every photo of `message["keys"]` and write the JSON lines; returns `out`."""
    from services.cropper.pseudo_labels import round_request
    from shared.images import content_hash, decode_image

    predictor = _predictor(message["model"], message["revision"], message["profile"],
                           message.get("collection"))  # fmt: skip
    datas = [store.get(key) for key in message["keys"]]
    images = [
        decode_image(d, k, settings.max_image_pixels)
        for d, k in zip(datas, message["keys"], strict=True)
    ]
    results = predictor.crop(images, [content_hash(d) for d in datas], round_request(message["n"]))
    lines = [
        json.dumps({"key": key, **result.to_dict()})
        for key, result in zip(message["keys"], results, strict=True)
    ]
    store.put(message["out"], "".join(s + "\n" for s in lines).encode(), "application/x-ndjson")
    return str(message["out"])


@functools.lru_cache(maxsize=2)
def _predictor(model: str, revision: int, profile: str, collection: str | None) -> Any:
    """The model of a round (a new revision is a new model at the same location)."""
    from services.cropper.predictor import build_predictor
    from shared.settings import get_settings

    log.info("loading %s (revision %s) for batch crops", model, revision)
    return build_predictor(get_settings(), profile, model=model, collection=collection)


def predict_on_queue(
    run: Any, r: int, photos: list[Any]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Trainer side: the proposals of `photos` (CAD canvases with object keys) from the model in
    `run`'s `last/` checkpoint, by crop-queue tasks; waits for every part."""
    from shared.storage import build_object_store

    config, settings = run.config, run.settings
    if not config.optim.out.startswith("s3://"):
        raise ProCropError(
            "weak.predict = 'queue' needs train.out on s3:// (the workers read the model)"
        )
    cad = [run.assembled.cad[p.name] for p in photos]
    missing = [c.name for c in cad if c.key is None]
    if missing:
        raise ProCropError(f"weak.predict = 'queue' needs s3:// CAD sources; {missing[0]} is local")
    store, by_key = build_object_store(settings), {c.key: c.name for c in cad}
    parts = _send_parts(run, r, [c.key for c in cad], store)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in _wait(store, parts, config.weak.timeout_s):
        for line in store.get(key).decode().splitlines():
            item = json.loads(line)
            boxes = np.asarray([c["box"] for c in item["crops"]], np.float64).reshape(-1, 4)
            out[by_key[item["key"]]] = (boxes, np.asarray([c["score"] for c in item["crops"]]))
    return out


def _send_parts(run: Any, r: int, keys: list[str], store: Any) -> list[str]:
    """One task per part not yet written; returns every part's output key."""
    config, weak = run.config, run.config.weak
    app = create_app(run.settings)
    base = f"{run.prefix}/labels/round-{r}/parts" if run.prefix else f"labels/round-{r}/parts"
    revision = _revision(run)
    outs = []
    for i, start in enumerate(range(0, len(keys), weak.batch_size)):
        out = f"{base}/{i:05d}.jsonl"
        outs.append(out)
        if store.exists(out):
            continue
        message = {"model": f"{config.optim.out.rstrip('/')}/last", "revision": revision,
                   "profile": config.model.profile, "collection": run.collection,
                   "keys": keys[start : start + weak.batch_size], "n": weak.proposals, "out": out}  # fmt: skip
        app.signature(CROP_BATCH, args=(message,)).apply_async(retry=True)
    log.info("round %d: %d batch-crop parts on the crop queue", r, len(outs))
    return outs


def _revision(run: Any) -> int:
    from services.cropper.checkpoint import read_trainer_state

    state = read_trainer_state(run.store, f"{run.prefix}/last" if run.prefix else "last")
    return int(state["epoch"]) if state else 0


def _wait(store: Any, keys: list[str], timeout_s: float) -> list[str]:
    deadline, pending = time.monotonic() + timeout_s, set(keys)
    while pending:
        pending = {k for k in pending if not store.exists(k)}
        if pending and time.monotonic() > deadline:
            raise ProCropError(f"{len(pending)} batch-crop parts not written in {timeout_s:.0f} s")
        if pending:
            time.sleep(0.5)
    return keys
