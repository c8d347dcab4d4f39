"""The `paper` profile end to end with tiny models: SAM tokens for retrieval, BLIP text, a ResNet
backbone; trained by `procrop train`, loaded from a folder by `procrop crop --profile paper`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import save_file

from procrop.cli import cli
from services.embedder.blip import build_blip
from shared.settings import load_settings

TINY_PAPER = """
[model]
profile = "tiny"
token_dim = 256   # SAM's neck width, whatever the encoder size
text_dim = 32     # the tiny BLIP's hidden size
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def paper_env(settings, monkeypatch, tiny_sam_checkpoint, tiny_blip_folders):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PROCROP_EMBEDDER__SAM_VARIANT", "vit_tiny")
    monkeypatch.setenv("PROCROP_EMBEDDER__SAM_CHECKPOINT", str(tiny_sam_checkpoint))
    monkeypatch.setenv("PROCROP_EMBEDDER__BLIP_MODEL", str(tiny_blip_folders["itm"]))
    monkeypatch.setenv("PROCROP_EMBEDDER__BLIP_CAPTION_MODEL", str(tiny_blip_folders["caption"]))
    return load_settings()


def _text_features(settings, photo_dir: Path, path: Path) -> None:
    """BLIP's caption + multimodal tokens of every photo, as the trainer reads them."""
    names = sorted(p.name for p in photo_dir.glob("*.jpg"))
    described = build_blip(settings.embedder).describe(
        [Image.open(photo_dir / n).convert("RGB") for n in names]
    )
    tokens, mask = described.embedding.tokens, described.embedding.mask
    save_file({n: np.ascontiguousarray(tokens[i][mask[i]]) for i, n in enumerate(names)}, str(path))


def test_paper_profile_train_and_crop(paper_env, photo_dir, tmp_path):
    records = []
    for path in sorted(photo_dir.glob("*.jpg")):
        w, h = Image.open(path).size
        records.append(
            {
                "image": path.name,
                "width": w,
                "height": h,
                "crop_xywh": [w // 8, h // 8, w // 2, h // 2],
            }
        )
    (tmp_path / "ann.json").write_text(json.dumps(records))
    _text_features(paper_env, photo_dir, tmp_path / "text.safetensors")
    config = tmp_path / "paper.toml"
    config.write_text(
        f'[data]\nannotations = "{tmp_path / "ann.json"}"\nimages = "{photo_dir}"\nsplit = "all"\n'
        f'collection = "sam6"\ntext_features = "{tmp_path / "text.safetensors"}"\n{TINY_PAPER}\n'
        f'[train]\nepochs = 2\nbatch_size = 3\nwarmup_steps = 1\nout = "{tmp_path / "run"}"\n'
    )
    code, out, err = run("train", "--config", str(config))
    assert code == 0, err
    model = str(tmp_path / "run" / "best")
    images = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    code, out, err = run(
        "crop", *images, "--profile", "paper", "--model", model, "--collection", "sam6", "-n", "3",
        "-a", "4:3", "--json",
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == images
    for line in lines:
        assert {c["aspect_ratio"] for c in line["crops"]} == {"4:3"}
        for crop in line["crops"]:
            x1, y1, x2, y2 = crop["box"]
            assert 0 <= x1 < x2 <= line["width"] and 0 <= y1 < y2 <= line["height"]
    # One photo alone gives the same crops as in the batch (SAM, BLIP and the model batch).
    _, alone, _ = run(
        "crop",
        images[2],
        "--profile",
        "paper",
        "--model",
        model,
        "--collection",
        "sam6",
        "-n",
        "3",
        "-a",
        "4:3",
        "--json",
    )
    assert [c["box"] for c in json.loads(alone)["crops"]] == [c["box"] for c in lines[2]["crops"]]


def test_paper_profile_needs_a_model(paper_env, photo_dir):
    code, _, err = run("crop", str(photo_dir / "coins.jpg"), "--profile", "paper")
    assert code == 1 and "the paper profile has no shipped model" in err
