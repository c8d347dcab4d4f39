"""The crop worker (queue `crop`): the last stage of a crop job, the crop model itself.

    procrop worker crop         # or: python -m services.cropper.worker

Reads the photo, its features (embed stage) and neighbours (retrieve stage), runs the model (ONNX
Runtime for the shipped bundle on a CPU, torch on the GPU when there is one) and the same
post-processing as `procrop crop`, writes `jobs/{job}/result.json` ({width, height, crops}) and
marks the job succeeded. A redelivered task writes the same result to the same key. The same
queue serves `procrop.crop.batch`: many photos by key with a training run's model, one JSON-lines
result (the pseudo-label rounds of weak training, services/cropper/batch_crops.py).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from celery import Task

from services.cropper.postprocess import CropRequest
from services.cropper.predictor import CropPredictor, build_predictor
from services.retriever.neighbors import Neighbors
from shared.images import decode_image
from shared.queue import CROP, CROP_BATCH, worker_app
from shared.settings import get_settings
from shared.storage.keys import job_key
from shared.worker import get_arrays, jobs, load_after_fork, object_store, run_stage, run_worker

app = worker_app()


@functools.cache
def predictor() -> CropPredictor:
    """The crop model of this worker process, loaded on first use."""
    settings = get_settings()
    return build_predictor(settings, settings.profile, precomputed=True)


def crop_photo(message: dict[str, Any]) -> dict[str, Any]:
    """Chain message (keys of the photo, features and neighbours; n, aspect_ratios) -> result."""
    model, store = predictor(), object_store()
    request = CropRequest.parse(message["n"], message["aspect_ratios"])
    image_key = message["image_key"]
    image = decode_image(store.get(image_key), image_key, get_settings().max_image_pixels)
    features, _ = get_arrays(message["features_key"])
    neighbors = None
    if model.config.use_retrieval and message.get("neighbors_key"):
        found, _ = get_arrays(message["neighbors_key"])  # already padded to K by the retriever
        neighbors = Neighbors(found["tokens"], found["crops"], found["has_crop"], found.get("wide"))
    cells, text = features.get("features"), features.get("text")
    result = model.crop_precomputed(image, features["tokens"], neighbors, text, request, cells)
    return result.to_dict()


def write_result(message: dict[str, Any]) -> str:
    """Crop and store the result; returns its key (the same for every delivery)."""
    key = job_key(message["job_id"], "result.json")
    result = crop_photo(message)
    object_store().put(key, json.dumps(result).encode(), "application/json")
    return key


@app.task(name=CROP, bind=True)
def crop(task: Task, message: dict[str, Any]) -> str:
    """Chain stage 3: store the result and finish the job; returns the result's key."""
    key = run_stage(task, message["job_id"], "crop", lambda: write_result(message))
    jobs().succeed(message["job_id"], key)
    return key


@app.task(name=CROP_BATCH)
def crop_batch(message: dict[str, Any]) -> str:
    """Batch prediction for weak training's pseudo-label rounds (services/cropper/batch_crops.py):
    crops many photos by object key with the model the message names; returns the output key."""
    from services.cropper.batch_crops import crop_keys

    return crop_keys(message, object_store(), get_settings())


load_after_fork(predictor)


def main() -> None:
    run_worker("crop")


if __name__ == "__main__":
    main()
