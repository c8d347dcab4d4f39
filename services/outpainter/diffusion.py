"""The paper profile's out-painter: ControlNet inpainting on Stable Diffusion 1.5 (diffusers).

    canvas (W, H) -> work size: long side `work_side`, both sides multiples of 8
    StableDiffusionControlNetInpaintPipeline, one batch per work size, per-item seeds
        image         the canvas (photo on grey)
        mask_image    white where the canvas is unknown, grown by one latent cell (see `_work_mask`)
        control[0]    inpaint ControlNet (control_v11p_sd15_inpaint): the canvas in [0, 1] with every
                      unknown pixel set to -1, the input that ControlNet was trained on
        control[1]    seg ControlNet (control_v11p_sd15_seg), when configured: the finest mask scale,
                      one fixed colour per segment label, black where no segment is (outside the photo)
    -> filled image at work size -> resized back to the canvas -> the photo's pixels pasted back

The seg ControlNet was trained on ADE20K class colours; our segments carry no class, so the colours
tell it only where regions are and where they end, which is what the out-paint should continue.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionControlNetInpaintPipeline,
)
from PIL import Image, ImageFilter

from services.outpainter.base import Canvas, paste_known
from shared.devices import resolve_device, resolve_dtype
from shared.errors import ModelLoadError, SettingsError
from shared.model_sources import load_local_first, resolve_source, source_version
from shared.settings import CadSettings

logger = logging.getLogger(__name__)

NEGATIVE_PROMPT = "frame, border, collage, text, watermark, blurry, lowres, distorted"
MULTIPLE = 8  # the pipeline's sides must be multiples of 8
_PALETTE_SEED = 0  # segment label -> colour; fixed so a run's control images are repeatable


@dataclass(frozen=True)
class _Item:
    """One canvas made ready for the pipeline at its work size."""

    image: Image.Image  # RGB, work size
    mask: Image.Image  # L, work size, 255 where the pipeline paints
    inpaint_control: torch.Tensor  # (3, h, w) float32, [0, 1], -1 where unknown
    seg_control: torch.Tensor | None  # (3, h, w) float32, [0, 1]: colour-coded finest scale


def work_size(size: tuple[int, int], work_side: int) -> tuple[int, int]:
    """(w, h) with the long side `work_side` (rounded), the aspect kept, both multiples of 8."""
    width, height = size
    scale = work_side / max(width, height)
    return tuple(  # type: ignore[return-value]
        max(MULTIPLE, round(side * scale / MULTIPLE) * MULTIPLE) for side in (width, height)
    )


def segment_colours(labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: label 0 black, label k a fixed bright colour (the same in every call)."""
    rng = np.random.default_rng(_PALETTE_SEED)
    palette = rng.integers(48, 256, (int(labels.max()) + 1, 3), dtype=np.uint8)
    palette[0] = 0
    return palette[labels]


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


class ControlNetOutpainter:
    """Out-paints canvases with a loaded `StableDiffusionControlNetInpaintPipeline`.

    One ControlNet: the inpaint control only; a `MultiControlNetModel` of two: inpaint + seg.
    """

    name = "controlnet-sd15"

    def __init__(
        self,
        pipe: StableDiffusionControlNetInpaintPipeline,
        *,
        version: str,
        steps: int = 30,
        guidance_scale: float = 7.5,
        work_side: int = 512,
        batch_size: int = 4,
        negative_prompt: str = NEGATIVE_PROMPT,
    ) -> None:
        """Wrap a loaded `pipe` (see `load_controlnet_outpainter`); `version` names its weights."""
        if batch_size < 1 or steps < 1 or work_side < MULTIPLE:
            raise ValueError(
                f"need batch_size >= 1, steps >= 1, work_side >= {MULTIPLE}; "
                f"got {batch_size}, {steps}, {work_side}"
            )
        multi = isinstance(pipe.controlnet, MultiControlNetModel)
        nets = len(pipe.controlnet.nets) if multi else 1
        if nets > 2:
            raise ValueError(f"expected 1 or 2 ControlNets (inpaint, seg), got {nets}")
        self.pipe = pipe
        self.version = version
        self.steps, self.guidance_scale = steps, guidance_scale
        self.work_side, self.batch_size = work_side, batch_size
        self.negative_prompt = negative_prompt
        self.uses_seg = nets == 2
        if self.uses_seg:  # its warning on every batch: per-item control images are what we pass
            logging.getLogger(StableDiffusionControlNetInpaintPipeline.__module__).setLevel(
                logging.ERROR
            )

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def outpaint(
        self,
        canvases: Sequence[Canvas],
        prompts: Sequence[str],
        controls: Sequence[np.ndarray],
        seeds: Sequence[int],
    ) -> list[Image.Image]:
        """Fill each canvas outside its photo; one RGB image per canvas, at the canvas's size.

        Canvases of one work size run together, `batch_size` at a time; item i's noise comes from
        its own `torch.Generator(seeds[i])`, so its fill does not depend on the batch it is in.
        """
        # 1. Check inputs
        self._check_inputs(canvases, prompts, controls, seeds)
        # 2. Group by work size (a batch shares one latent shape), keeping input order for results
        groups: dict[tuple[int, int], list[int]] = {}
        for index, canvas in enumerate(canvases):
            groups.setdefault(work_size(canvas.size, self.work_side), []).append(index)
        filled: dict[int, Image.Image] = {}
        for size, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                items = [self._prepare(canvases[i], controls[i], size) for i in chunk]
                images = self._run(items, [prompts[i] for i in chunk], [seeds[i] for i in chunk])
                filled.update(zip(chunk, images, strict=True))
        # 3. Back to canvas size, the photo's own pixels exactly
        return [paste_known(canvas, filled[i]) for i, canvas in enumerate(canvases)]

    def _check_inputs(
        self,
        canvases: Sequence[Canvas],
        prompts: Sequence[str],
        controls: Sequence[np.ndarray],
        seeds: Sequence[int],
    ) -> None:
        lengths = (len(canvases), len(prompts), len(controls), len(seeds))
        if len(set(lengths)) != 1:
            raise ValueError(f"canvases, prompts, controls, seeds differ in length: {lengths}")
        for index, (canvas, control) in enumerate(zip(canvases, controls, strict=True)):
            width, height = canvas.size
            if control.ndim != 3 or control.shape[1:] != (height, width) or len(control) < 1:
                raise ValueError(
                    f"controls[{index}]: expected (S >= 1, {height}, {width}) label maps, "
                    f"got shape {control.shape}"
                )

    def _prepare(self, canvas: Canvas, control: np.ndarray, size: tuple[int, int]) -> _Item:
        """The canvas, its paint mask and its control images at work `size`."""
        image = canvas.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        mask = self._work_mask(canvas.known, size)
        rgb = np.asarray(image)
        unknown = np.asarray(mask) > 127  # (h, w) bool
        inpaint = _to_tensor(rgb)
        inpaint[:, torch.from_numpy(unknown)] = -1.0  # the inpaint ControlNet's "fill here" mark
        seg = None
        if self.uses_seg:
            finest = Image.fromarray(control[-1].astype(np.int32)).resize(
                size, Image.Resampling.NEAREST
            )
            seg = _to_tensor(segment_colours(np.asarray(finest).astype(np.int64)))
        return _Item(image=image, mask=mask, inpaint_control=inpaint, seg_control=seg)

    def _work_mask(self, known: np.ndarray, size: tuple[int, int]) -> Image.Image:
        """L image at `size`, 255 on every pixel to paint.

        A work pixel is kept only if it is wholly photo; the unknown area then grows by one latent
        cell, so no latent cell that touches the grey border is kept (it would leave a grey seam).
        The photo's pixels are restored exactly at canvas size by `paste_known`.
        """
        unknown = Image.fromarray(((~known) * 255).astype(np.uint8))
        shrunk = unknown.resize(size, Image.Resampling.BOX)  # > 0 wherever a pixel was unknown
        binary = shrunk.point(lambda v: 255 if v > 0 else 0)
        cell = int(self.pipe.vae_scale_factor)
        return binary.filter(ImageFilter.MaxFilter(2 * cell + 1))

    @torch.inference_mode()
    def _run(self, items: list[_Item], prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One pipeline call over items of one work size; RGB images at that size."""
        width, height = items[0].image.size
        inpaint = torch.stack([item.inpaint_control for item in items])  # (B, 3, h, w)
        control: torch.Tensor | list[torch.Tensor] = inpaint
        if self.uses_seg:
            seg = torch.stack([item.seg_control for item in items])  # type: ignore[misc]
            control = [inpaint, seg]
        generators = [torch.Generator(self.generator_device).manual_seed(s) for s in seeds]
        output = self.pipe(
            prompt=prompts,
            negative_prompt=[self.negative_prompt] * len(items),
            image=[item.image for item in items],
            mask_image=[item.mask for item in items],
            control_image=control,
            height=height,
            width=width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            controlnet_conditioning_scale=1.0,
            generator=generators,
            output_type="pil",
        )
        return list(output.images)

    @property
    def generator_device(self) -> str:
        """Where seeds draw their noise: the model's device, so a seed means one fill per device."""
        return self.device.type


def _load_controlnet(name: str, dtype: torch.dtype, what: str) -> tuple[ControlNetModel, str]:
    source, local = resolve_source(name, what)
    model = load_local_first(
        lambda offline: ControlNetModel.from_pretrained(
            source, dtype=dtype, local_files_only=offline
        ),
        source,
        local,
        what,
    )
    return model, source_version(source, local)


def _load_pipeline(
    name: str, controlnet: ControlNetModel | MultiControlNetModel, dtype: torch.dtype
) -> tuple[StableDiffusionControlNetInpaintPipeline, str]:
    what = "Stable Diffusion base model"
    source, local = resolve_source(name, what)
    pipe = load_local_first(
        lambda offline: StableDiffusionControlNetInpaintPipeline.from_pretrained(
            source,
            controlnet=controlnet,
            safety_checker=None,  # CAD fills borders of professional photos; no NSFW filter
            feature_extractor=None,
            requires_safety_checker=False,
            dtype=dtype,
            local_files_only=offline,
        ),
        source,
        local,
        what,
    )
    return pipe, source_version(source, local)


def load_controlnet_outpainter(cad: CadSettings) -> ControlNetOutpainter:
    """The out-painter `cad` describes: base_model, controlnet_inpaint, controlnet_seg (or None),
    steps, guidance_scale, work_side, batch_size, dtype, device.

    `version`: each model's folder name and weight digest, or hub id and snapshot commit.

    Raises:
        ModelLoadError: a model is missing, cannot be downloaded, or does not load.
        SettingsError: `device` is not a torch device.
    """
    try:
        device = resolve_device(cad.device)
    except ValueError as exc:
        raise SettingsError(f"PROCROP_CAD__DEVICE: {exc}") from None
    dtype = resolve_dtype(cad.dtype, device)
    inpaint, inpaint_version = _load_controlnet(cad.controlnet_inpaint, dtype, "inpaint ControlNet")
    controlnet: ControlNetModel | MultiControlNetModel = inpaint
    versions = [inpaint_version]
    if cad.controlnet_seg is not None:
        seg, seg_version = _load_controlnet(cad.controlnet_seg, dtype, "seg ControlNet")
        controlnet = MultiControlNetModel([inpaint, seg])
        versions.append(seg_version)
    pipe, base_version = _load_pipeline(cad.base_model, controlnet, dtype)
    try:
        pipe = pipe.to(device)
    except RuntimeError as exc:  # e.g. CUDA out of memory
        raise ModelLoadError(f"cannot move the out-painting models to {device}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    version = ";".join([base_version, *versions, str(dtype).removeprefix("torch.")])
    logger.info("loaded the ControlNet out-painter (%s) on %s", version, device)
    return ControlNetOutpainter(
        pipe,
        version=version,
        steps=cad.steps,
        guidance_scale=cad.guidance_scale,
        work_side=cad.work_side,
        batch_size=cad.batch_size,
    )
