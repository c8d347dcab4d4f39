"""The paper profile's multi-scale segment masks: SAM's automatic mask generator, one pass, split
into levels by segment size.

    photo -> long side at most 1024 px (SAM's own input size; its masks come from 256 x 256 logits)
          -> SamAutomaticMaskGenerator: a points_per_side^2 prompt grid, 3 masks per point
             (SAM's whole / part / sub-part), filtered by predicted IoU and stability, NMS
          -> level s (coarse to fine) keeps the masks of at least `min_shares[s]` of the photo,
             painted largest first so smaller segments lie on top of the regions that hold them
          -> label maps renumbered by decreasing visible area, scaled back to the photo's size

Why levels by size from one pass, not one generator run per `points_per_side` or `crop_n_layers`:
each point prompt already gives SAM's three granularities, so a sparser grid does not produce
coarser segments, only fewer of them (and misses small subjects); crop layers re-encode zoomed
crops to find *smaller* things. Both cost one more image encoding per level (the ViT is nearly all
of SAM's cost), and neither separates scales. Sorting the one pass's masks by size does, for the
price of one encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam

from services.embedder.masks import relabel_by_area
from services.embedder.sam import file_digest, load_sam
from shared.devices import resolve_device
from shared.errors import ModelLoadError, SettingsError
from shared.settings import CadSettings, EmbedderSettings

logger = logging.getLogger(__name__)

COARSE_SHARE = 1 / 16  # the coarsest level: segments of at least 6.25 % of the photo
FINE_SHARE = 1 / 1024  # the finest: down to 0.1 % (a 32 x 32 px subject at 1024 px)


def level_shares(scales: int) -> list[float]:
    """Least segment area per level, as a share of the photo: geometric, coarse to fine."""
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}")
    if scales == 1:
        return [FINE_SHARE]
    return np.geomspace(COARSE_SHARE, FINE_SHARE, scales).tolist()


def paint_segments(masks: Sequence[np.ndarray], min_area: float) -> np.ndarray:
    """One (h, w) uint16 label map from overlapping boolean masks of at least `min_area` pixels.

    Larger masks are painted first and smaller ones over them, so a subject inside a region stays
    visible; labels are then renumbered 1..n by decreasing visible area (0: no segment).
    """
    if not masks:
        raise ValueError("need at least one mask (for the map's size)")
    kept = sorted((m for m in masks if m.sum() >= min_area), key=lambda m: -int(m.sum()))
    labels = np.zeros(masks[0].shape, np.int32)
    for index, mask in enumerate(kept, start=1):
        labels[mask] = index
    return relabel_by_area(labels)


class SamMaskMaker:
    """Multi-scale segment label maps of photos from a loaded SAM (see module docstring)."""

    name = "sam"

    def __init__(
        self,
        sam: Sam,
        *,
        version: str,
        scales: int = 2,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        max_side: int = 1024,
    ) -> None:
        """Wrap `sam` (any device); the thresholds are SAM's own defaults for ViT-H."""
        self.shares = level_shares(scales)
        self.max_side = max_side
        self.generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            output_mode="binary_mask",
        )
        self.version = f"{version}-grid{points_per_side}-levels{scales}"

    def masks(self, photo: Image.Image) -> np.ndarray:
        """(S, h, w) uint16 label maps at the photo's size (h, w), coarse to fine."""
        rgb = photo.convert("RGB")
        work = rgb.copy()
        work.thumbnail((self.max_side, self.max_side), Image.Resampling.BILINEAR)
        found = self.generator.generate(np.asarray(work))  # dicts: segmentation (h', w') bool
        segments = [record["segmentation"] for record in found]
        height, width = work.height, work.width
        maps = []
        for share in self.shares:
            labels = (
                paint_segments(segments, share * height * width)
                if segments
                else np.zeros((height, width), np.uint16)
            )
            if work.size != rgb.size:
                scaled = Image.fromarray(labels.astype(np.int32)).resize(
                    rgb.size, Image.Resampling.NEAREST
                )
                labels = np.asarray(scaled).astype(np.uint16)
            maps.append(labels)
        logger.debug("SAM found %d masks on a %dx%d photo", len(segments), width, height)
        return np.stack(maps)


def load_sam_mask_maker(embedder: EmbedderSettings, cad: CadSettings) -> SamMaskMaker:
    """The mask maker the settings describe: SAM `embedder.sam_variant` from
    `embedder.sam_checkpoint` on `embedder.device`, `cad.mask_scales` levels.

    Raises:
        ModelLoadError: no checkpoint configured, or it cannot be loaded.
        SettingsError: `device` is not a torch device.
    """
    if embedder.sam_checkpoint is None:
        raise ModelLoadError(
            "no SAM checkpoint configured for the CAD masks: "
            "set PROCROP_EMBEDDER__SAM_CHECKPOINT to a local .pth file"
        )
    try:
        device = resolve_device(embedder.device)
    except ValueError as exc:
        raise SettingsError(f"PROCROP_EMBEDDER__DEVICE: {exc}") from None
    checkpoint = Path(embedder.sam_checkpoint).expanduser()
    sam = load_sam(embedder.sam_variant, checkpoint, device)
    version = f"sam-{embedder.sam_variant}-{file_digest(checkpoint)}"
    logger.info("loaded SAM %s masks from %s (%s)", embedder.sam_variant, checkpoint, version)
    return SamMaskMaker(sam, version=version, scales=cad.mask_scales)
