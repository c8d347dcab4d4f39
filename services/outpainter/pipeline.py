"""One CAD item, start to end: photo -> canvas -> description and masks -> out-paint -> filter.

An item is one (photo, variant) of a run. Its objects live under `{prefix}items/{item}/`, where
`item` = `{photo sha256[:20]}-v{variant}` and the prefix is the run's (`datasets/{run}/` in the
object store, or the root of `procrop cad --out`); the run's seed is part of the run, so the keys
derive from (run, photo hash, variant, seed) and a redelivered task rewrites the same objects:

    scene.json    the placement (canvas size, the photo's pixel box), layout cues, the description
    image.jpg     the out-painted canvas (accepted and rejected items alike, for inspection)
    item.json     the item's record, written last: status, reasons, filter metrics, its crop label

What depends on the photo alone is made once per photo, whatever its number of variants, under
`{prefix}photos/{sha256[:20]}/`: `masks.npz` (its multi-scale segment masks, (S, h, w) uint16 at
the photo's size: SAM's automatic mask generator is the costliest model of the describe stage)
and `description.json` (layout cues, inside, beyond, prompt: BLIP and the language model).

The two stages split where the queues do: `describe` (masks and description: SAM and BLIP, on the
embed workers' GPUs) and `fill` (out-paint and filter, on the outpaint workers').
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from services.embedder.describer import Describer, Scene, build_describer
from services.embedder.masks import MaskMaker, build_mask_maker, layout_cues
from services.outpainter.base import Outpainter
from services.outpainter.canvas import Placement, item_seed, place, place_masks, plan_placement
from services.outpainter.quality import Verdict, judge
from shared.errors import ObjectNotFoundError
from shared.images import content_hash, decode_image
from shared.settings import CadSettings, EmbedderSettings, Settings
from shared.storage import ObjectStore

JPEG_QUALITY = 95


def item_id(sha256: str, variant: int) -> str:
    return f"{sha256[:20]}-v{variant}"


def item_key(prefix: str, item: str, name: str) -> str:
    return f"{prefix}items/{item}/{name}"


def photo_key(prefix: str, sha256: str, name: str) -> str:
    return f"{prefix}photos/{sha256[:20]}/{name}"


@dataclass(frozen=True)
class Described:
    """The describe stage's output: where the photo goes, its masks, what to paint around it."""

    placement: Placement
    layout: str
    scene: Scene
    masks: np.ndarray  # (S, h, w) uint16 at the photo's size

    def description(self) -> dict[str, str]:
        """What depends on the photo alone (shared by its variants)."""
        s = self.scene
        return {"layout": self.layout, "inside": s.inside, "beyond": s.beyond, "prompt": s.prompt}

    def scene_json(self) -> bytes:
        return json.dumps(
            {**self.placement.to_dict(), **self.description()}, sort_keys=True
        ).encode()

    def masks_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, masks=self.masks)
        return buffer.getvalue()

    @classmethod
    def from_objects(cls, scene_json: bytes, masks_npz: bytes) -> Described:
        raw = json.loads(scene_json)
        width, height = raw["canvas"]
        placement = Placement(int(width), int(height), tuple(int(v) for v in raw["box"]))  # type: ignore[arg-type]
        scene = Scene(raw["inside"], raw["beyond"], raw["prompt"])
        with np.load(io.BytesIO(masks_npz)) as data:
            masks = data["masks"]
        return cls(placement, raw["layout"], scene, masks)


@dataclass(frozen=True)
class Filled:
    image: Image.Image
    verdict: Verdict


class Pipeline:
    """The stages with their models; build once per process (`build_pipeline`)."""

    def __init__(
        self,
        cad: CadSettings,
        embedder: EmbedderSettings | None = None,
        describer: Describer | None = None,
        masks: MaskMaker | None = None,
        outpainter: Outpainter | None = None,
    ) -> None:
        self.cad, self.embedder = cad, embedder or EmbedderSettings()
        self._describer, self._masks, self._outpainter = describer, masks, outpainter

    # Models load on first use, so a describe worker never loads the diffusion models, nor an
    # outpaint worker SAM and BLIP.
    @property
    def describer(self) -> Describer:
        if self._describer is None:
            self._describer = build_describer(self.cad, self.embedder)
        return self._describer

    @property
    def mask_maker(self) -> MaskMaker:
        if self._masks is None:
            self._masks = build_mask_maker(self.cad, self.embedder)
        return self._masks

    @property
    def outpainter(self) -> Outpainter:
        if self._outpainter is None:
            self._outpainter = build_outpainter(self.cad)
        return self._outpainter

    def versions(self) -> dict[str, str]:
        """What made the items: recorded in run.json."""
        return {
            "describer": f"{self.describer.name} {self.describer.version}",
            "masks": f"{self.mask_maker.name} {self.mask_maker.version}",
            "outpainter": f"{self.outpainter.name} {self.outpainter.version}",
        }

    def describe(
        self,
        photo: Image.Image,
        sha256: str,
        variant: int,
        run_seed: int,
        known: Described | None = None,
    ) -> Described:
        """The item's placement, with the photo's masks and description (`known`: made for
        another variant of the photo, reused as they are)."""
        placement = plan_placement(photo.size, item_seed(run_seed, sha256, variant), self.cad)
        if known is not None:
            return Described(placement, known.layout, known.scene, known.masks)
        masks = self.mask_maker.masks(photo)
        layout = layout_cues(masks[0])
        return Described(placement, layout, self.describer.describe(photo, layout), masks)

    def fill(
        self, photo: Image.Image, described: Described, sha256: str, variant: int, run_seed: int
    ) -> Filled:
        canvas = place(photo, described.placement)
        controls = place_masks(described.masks, described.placement)
        seed = item_seed(run_seed, sha256, variant)
        [image] = self.outpainter.outpaint([canvas], [described.scene.prompt], [controls], [seed])
        return Filled(image, judge(image, described.placement.box, self.cad))


def build_outpainter(cad: CadSettings) -> Outpainter:
    """`lite` (OpenCV, CPU) or `controlnet` (diffusers, SD-1.5 + ControlNet inpaint)."""
    if cad.outpainter == "lite":
        from services.outpainter.lite import LiteOutpainter

        return LiteOutpainter()
    from services.outpainter.diffusion import load_controlnet_outpainter

    return load_controlnet_outpainter(cad)


def build_pipeline(settings: Settings) -> Pipeline:
    return Pipeline(settings.cad, settings.embedder)


def read_photo(data: bytes, name: str, settings: Settings) -> tuple[Image.Image, str]:
    """Decode a source photo (bad input raises `InvalidImageError`); returns it and its sha256."""
    return decode_image(data, name, settings.max_image_pixels), content_hash(data)


def item_record(
    item: str,
    photo: str,
    sha256: str,
    variant: int,
    described: Described,
    filled: Filled,
    prefix: str = "",
) -> dict[str, Any]:
    """The item's record (item.json), with its crop label in `procrop train`'s JSON-lines form:
    the photo's placed box, in canvas pixels, is the first crop."""
    placement = described.placement
    return {
        "item": item,
        "photo": photo,
        "sha256": sha256,
        "variant": variant,
        "status": "accepted" if filled.verdict.accepted else "rejected",
        "reasons": list(filled.verdict.reasons),
        "metrics": filled.verdict.metrics,
        "image": f"items/{item}/image.jpg",
        "width": placement.canvas_w,
        "height": placement.canvas_h,
        "crops": [{"box": list(placement.box), "score": 1.0}],
        "region": [round(v, 6) for v in placement.region],
        "scene": f"items/{item}/scene.json",
        "masks": f"photos/{sha256[:20]}/masks.npz",
        "prompt": described.scene.prompt,
    }


def failed_record(item: str, photo: str, variant: int, reason: str) -> dict[str, Any]:
    return {
        "item": item,
        "photo": photo,
        "variant": variant,
        "status": "failed",
        "reasons": [reason],
    }


def read_photo_description(store: ObjectStore, prefix: str, sha256: str) -> Described | None:
    """The photo's masks and description if a variant made them already (placement unset)."""
    try:
        description = json.loads(store.get(photo_key(prefix, sha256, "description.json")))
        masks = store.get(photo_key(prefix, sha256, "masks.npz"))
    except ObjectNotFoundError:
        return None
    unplaced = json.dumps({"canvas": [0, 0], "box": [0, 0, 0, 0], **description}).encode()
    return Described.from_objects(unplaced, masks)


def describe_item(
    pipeline: Pipeline, store: ObjectStore, prefix: str, item: str,
    photo: Image.Image, sha256: str, variant: int, run_seed: int,
) -> Described:  # fmt: skip
    """The describe stage with its objects: the photo's masks and description made once (the
    first of its variants to get here writes them; a race writes the same bytes twice)."""
    known = read_photo_description(store, prefix, sha256)
    described = pipeline.describe(photo, sha256, variant, run_seed, known)
    if known is None:
        store.put(photo_key(prefix, sha256, "masks.npz"), described.masks_npz())
        description = json.dumps(described.description(), sort_keys=True).encode()
        store.put(photo_key(prefix, sha256, "description.json"), description, "application/json")
    store.put(item_key(prefix, item, "scene.json"), described.scene_json(), "application/json")
    return described


def read_described(store: ObjectStore, prefix: str, item: str, sha256: str) -> Described:
    """What the describe stage wrote for `item` (the fill stage reads it back)."""
    return Described.from_objects(
        store.get(item_key(prefix, item, "scene.json")),
        store.get(photo_key(prefix, sha256, "masks.npz")),
    )


def write_filled(
    store: ObjectStore, prefix: str, item: str, filled: Filled, record: dict[str, Any]
) -> None:
    buffer = io.BytesIO()
    filled.image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    store.put(item_key(prefix, item, "image.jpg"), buffer.getvalue(), "image/jpeg")
    write_record(store, prefix, item, record)


def write_record(store: ObjectStore, prefix: str, item: str, record: dict[str, Any]) -> None:
    store.put(
        item_key(prefix, item, "item.json"),
        json.dumps(record, sort_keys=True).encode(),
        "application/json",
    )


def label_line(record: dict[str, Any]) -> str:
    """An accepted item as one line of `procrop train`'s JSON-lines annotations."""
    keep = ("image", "width", "height", "crops", "scene", "masks", "item", "photo")
    return json.dumps({k: record[k] for k in keep}, sort_keys=True)
