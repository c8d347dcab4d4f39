"""Tiny seeded SD-1.5-shaped models (UNet, VAE, CLIP text encoder and tokenizer, ControlNets),
saved with `save_pretrained` as on the hub: the paper profile's out-painter tests load them back
through the real loading code (`load_controlnet_outpainter`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BLOCKS = (32, 64)  # two blocks everywhere: VAE and ControlNet embedding both downsample 2x
CROSS_DIM = 32
WORDS = ["a", "photo", "of", "the", "sea", "sky", "beach", "wide", "view", "blurry", "text"]


def _tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP's byte-level BPE over letters, a few words and no merges beyond them; no download."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    tokens += [f"{word}</w>" for word in WORDS if len(word) > 1]
    merges = []
    for word in WORDS:  # merge each word left to right, so it becomes one token
        if len(word) > 1:
            pieces = [*word[:-1], word[-1] + "</w>"]
            while len(pieces) > 1:
                merges.append(f"{pieces[0]} {pieces[1]}")
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                if len(pieces) > 1 and pieces[0] not in tokens:
                    tokens.append(pieces[0])
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)  # reads the two files


def _tiny_controlnet(seed: int) -> ControlNetModel:
    torch.manual_seed(seed)
    return ControlNetModel(
        block_out_channels=BLOCKS,
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=CROSS_DIM,
        conditioning_embedding_out_channels=(16, 32),
        attention_head_dim=4,
    )


def _tiny_base(folder: Path) -> None:
    """An SD-1.5-shaped pipeline folder (model_index.json + one folder per component)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=BLOCKS,
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=list(BLOCKS),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )
    folder.mkdir()
    tokenizer = _tiny_tokenizer(folder)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def build_tiny_sd15(root: Path) -> dict[str, Path]:
    """Folders `base` (SD-1.5 pipeline), `inpaint` and `seg` (ControlNets) under `root`."""
    _tiny_base(root / "base")
    for seed, kind in enumerate(("inpaint", "seg"), start=1):
        _tiny_controlnet(seed).save_pretrained(root / kind)
    return {"base": root / "base", "inpaint": root / "inpaint", "seg": root / "seg"}
