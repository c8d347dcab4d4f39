"""The embed worker (queue `embed`): a photo -> its composition features, the first stage of a crop.

    procrop worker embed        # or: python -m services.embedder.worker

Reads the photo at `image_key`, encodes it with the composition encoder of the profile (`lite`,
or SAM for `paper`; on the GPU when there is one) and, for the paper profile, describes it with
BLIP. Writes `features/{encoder}-{version}/{sha256}.safetensors`: tokens (64, T) f32, vector (D,)
f32 and, paper profile, text (L, D) f32; metadata: the encoder spec. The key derives from the
photo's bytes and the encoder, so a photo is embedded once, however often it is sent.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from celery import Task

from services.embedder.base import CompositionEncoder
from shared.images import decode_image
from shared.queue import EMBED, worker_app
from shared.settings import get_settings
from shared.storage.keys import features_key
from shared.worker import chain_stage, load_after_fork, object_store, put_arrays, run_worker

app = worker_app()


@dataclass(frozen=True)
class EmbedModels:
    encoder: CompositionEncoder
    text: Any  # BlipTextEmbedder in the paper profile, else None


@functools.cache
def models() -> EmbedModels:
    """The encoder (and BLIP) of this worker process, loaded on first use."""
    from services.embedder.registry import build_encoder
    from shared.checkpoints import model_location, read_model_card

    settings = get_settings()
    paper = settings.profile == "paper"
    card = read_model_card(model_location(settings, settings.profile), settings)
    encoder = build_encoder(settings.embedder, card.encoder)  # the crop model's own encoder
    text = None
    if paper:
        from services.embedder.blip import build_blip

        text = build_blip(settings.embedder)
    return EmbedModels(encoder, text)


def embed_photo(image_key: str, sha256: str) -> str:
    """Encode the photo at `image_key` unless its features exist; returns their key."""
    m = models()
    key = features_key(m.encoder.name, m.encoder.version, sha256)
    store = object_store()
    if store.exists(key):
        return key
    image = decode_image(store.get(image_key), image_key, get_settings().max_image_pixels)
    embedding = m.encoder.encode([image])
    arrays = {"tokens": embedding.tokens[0], "vector": embedding.vectors[0]}
    if embedding.features is not None:  # the features backbone's input (effnet encoder)
        arrays["features"] = embedding.features[0]
    if m.text is not None:
        described = m.text.describe([image]).embedding
        arrays["text"] = described.tokens[0][described.mask[0]]
    put_arrays(key, arrays, {"encoder": json.dumps(m.encoder.spec, sort_keys=True)})
    return key


@app.task(name=EMBED, bind=True)
def embed(task: Task, message: dict[str, Any]) -> dict[str, Any]:
    """Chain stage 1: `message` has job_id, image_key, sha256; adds features_key."""
    image_key, sha = message["image_key"], message["sha256"]
    return chain_stage(task, message, "embed", "features_key", lambda: embed_photo(image_key, sha))


load_after_fork(models)


def main() -> None:
    import services.outpainter.worker  # noqa: F401  (CAD runs' describe stage is an embed task)

    run_worker("embed")


if __name__ == "__main__":
    main()
