"""The paper profile through the local stack, with tiny models saved like real weights: SAM tokens
in the embed worker, BLIP's multimodal text too, an index job with the SAM encoder over HTTP, and
the crop worker on torch; the answer equals `procrop crop --profile paper` on the same index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

pytestmark = pytest.mark.slow
KEY = "paper-key-0123456789"
TINY_PAPER = '[model]\nprofile = "tiny"\ntoken_dim = 256\ntext_dim = 32\n'


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    return subprocess.run(
        [sys.executable, "-m", "procrop", *args], env={**base, **env}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def _train(env: dict[str, str], photo_dir: Path, out: Path) -> Path:
    """A tiny paper-profile model trained in embedded mode (its own Milvus Lite file)."""
    from services.embedder.blip import build_blip
    from shared.settings import load_settings

    names = sorted(p.name for p in photo_dir.glob("*.jpg"))
    records = []
    for name in names:
        w, h = Image.open(photo_dir / name).size
        records.append({"image": name, "width": w, "height": h, "crop_xywh": [w // 8, h // 8, w // 2, h // 2]})  # fmt: skip
    (out / "ann.json").write_text(json.dumps(records))
    blip_env = {
        k.removeprefix("PROCROP_EMBEDDER__").lower(): v for k, v in env.items() if "EMBEDDER" in k
    }
    described = build_blip(load_settings(embedder=blip_env).embedder).describe(
        [Image.open(photo_dir / n).convert("RGB") for n in names]
    )
    tokens, mask = described.embedding.tokens, described.embedding.mask
    texts = {n: np.ascontiguousarray(tokens[i][mask[i]]) for i, n in enumerate(names)}
    save_file(texts, str(out / "text.safetensors"))
    config = out / "paper.toml"
    config.write_text(
        f'[data]\nannotations = "{out / "ann.json"}"\nimages = "{photo_dir}"\nsplit = "all"\n'
        f'collection = "sam6"\ntext_features = "{out / "text.safetensors"}"\n{TINY_PAPER}\n'
        f'[train]\nepochs = 1\nbatch_size = 3\nwarmup_steps = 1\nout = "{out / "run"}"\n'
    )
    trained = _run(
        {**env, "PROCROP_HOME": str(out / "train-home")}, "train", "--config", str(config)
    )
    assert trained.returncode == 0, trained.stderr
    return out / "run" / "last"


@pytest.fixture(scope="module")
def paper_stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_sam_checkpoint: Path,
    tiny_blip_folders: dict[str, Path],
    photo_dir: Path,
) -> Iterator[dict[str, Any]]:
    models = {
        "HF_HUB_OFFLINE": "1",
        "PROCROP_EMBEDDER__SAM_VARIANT": "vit_tiny",
        "PROCROP_EMBEDDER__SAM_CHECKPOINT": str(tiny_sam_checkpoint),
        "PROCROP_EMBEDDER__BLIP_MODEL": str(tiny_blip_folders["itm"]),
        "PROCROP_EMBEDDER__BLIP_CAPTION_MODEL": str(tiny_blip_folders["caption"]),
    }
    model = _train(models, photo_dir, tmp_path_factory.mktemp("paper-train"))
    home = tmp_path_factory.mktemp("paper-stack")
    env = {
        **models, "PROCROP_HOME": str(home), "PROCROP_API_KEYS": KEY, "PROCROP_PROFILE": "paper",
        "PROCROP_CROP__MODEL": str(model), "PROCROP_CROP__COLLECTION": "sam6",
    }  # fmt: skip
    up = _run(env, "stack", "up")
    assert up.returncode == 0, up.stderr
    state = json.loads((home / "stack" / "stack.json").read_text())
    yield {**json.loads(up.stdout.strip().splitlines()[-1]), "env": state["env"], "model": model}
    assert _run(env, "stack", "down").returncode == 0


def test_paper_profile_through_the_stack(paper_stack: dict[str, Any], photo_dir: Path) -> None:
    from shared.settings import load_settings
    from shared.storage import build_object_store

    env = paper_stack["env"]
    store = build_object_store(load_settings(storage={
        "backend": "s3", "endpoint": env["PROCROP_STORAGE__ENDPOINT"],
        "access_key": env["PROCROP_STORAGE__ACCESS_KEY"], "secret_key": env["PROCROP_STORAGE__SECRET_KEY"],
    }))  # fmt: skip
    for photo in sorted(photo_dir.glob("*.jpg")):
        store.put(f"pro/{photo.name}", photo.read_bytes())
    # The crop model's collection is the operator's (tenants cannot write it through the API:
    # shared/ownership.py), so it is indexed with the operator's command against the stack.
    bucket = env.get("PROCROP_STORAGE__BUCKET", "procrop")
    indexed = _run(env, "index", f"s3://{bucket}/pro/", "-c", "sam6", "--encoder", "sam")
    assert indexed.returncode == 0, indexed.stderr
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=paper_stack["gateway"], headers=headers, timeout=120) as client:
        photo = photo_dir / "rocket.jpg"
        response = client.post(
            "/v1/crops", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
            data={"n": "3", "aspect_ratios": "4:3", "wait": "60"},
        )  # fmt: skip
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body
    embedded = _run(
        env, "crop", str(photo), "--profile", "paper", "--model", str(paper_stack["model"]),
        "--collection", "sam6", "-n", "3", "-a", "4:3", "--json",
    )  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr
    expected = json.loads(embedded.stdout)
    assert body["result"] == {k: expected[k] for k in ("width", "height", "crops")}


def _until(ready: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")
