"""Weak supervision through the crop workers of `procrop stack up`: a CAD run of four sample photos
(lite out-painter) into the stack's bucket, stage 1 of a tiny model, and two pseudo-label rounds
whose batch prediction runs as `procrop.crop.batch` tasks on the real crop worker (the model read
from the bucket, neighbours from the stack's Milvus); the run interrupted after round 1 and
resumed: round 1 is read back, round 2 made, every canvas predicted by the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings, load_settings
from shared.storage import build_object_store
from tests.tiny_crop_model import TINY_MODEL_TOML

pytestmark = pytest.mark.slow
TINY = (
    TINY_MODEL_TOML
    + """
[train]
epochs = 4
batch_size = 2
warmup_steps = 1
lr = 1e-3
out = "s3://{bucket}/runs/weak-e2e"

[weak]
sources = ["s3://{bucket}/datasets/weak-e2e/"]
rounds = 2
k = 4
min_region_iou = 0.5
predict = "queue"
batch_size = 2
timeout_s = 240
"""
)


class Interrupted(Exception):
    pass


def _procrop(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    return subprocess.run([sys.executable, "-m", "procrop", *args], env={**base, "PROCROP_HOME": str(home)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("weak-stack")
    up = _procrop(home, "stack", "up")
    assert up.returncode == 0, up.stderr
    state = json.loads((home / "stack" / "stack.json").read_text())
    yield {**state["env"], "PROCROP_HOME": str(home)}
    assert _procrop(home, "stack", "down").returncode == 0


@pytest.fixture
def stack_settings(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("PROCROP_"):
            monkeypatch.delenv(name)
    for name, value in stack_env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def _cad_into_the_bucket(photo_dir: Path, settings: Settings) -> Any:
    from services.outpainter.pipeline import build_pipeline
    from services.outpainter.run import RunParams, run_embedded

    store = build_object_store(settings)
    photos = sorted(photo_dir.glob("*.jpg"))[:4]
    source = photo_dir.parent / "weak-e2e-photos"
    source.mkdir(exist_ok=True)
    for p in photos:
        (source / p.name).write_bytes(p.read_bytes())
    run_embedded(RunParams(str(source), variants=1), build_pipeline(settings), store, settings,
                 prefix="datasets/weak-e2e/")  # fmt: skip
    return store


def test_rounds_on_the_crop_worker_resume_between_rounds(
    photo_dir: Path, stack_settings: Settings, tmp_path: Path
) -> None:
    from services.cropper.train import load_train_config
    from services.cropper.weak import train_weak

    store = _cad_into_the_bucket(photo_dir, stack_settings)
    canvases = store.get("datasets/weak-e2e/labels.jsonl").decode().splitlines()
    assert len(canvases) >= 2
    path = tmp_path / "weak.toml"
    path.write_text(TINY.format(bucket=stack_settings.storage.bucket))
    config = load_train_config(path)
    rounds: list[int] = []

    def stop_after_round_1(r: int, record: dict) -> None:
        rounds.append(r)
        if r == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_weak(config, stack_settings, on_round=stop_after_round_1)
    first = store.get("runs/weak-e2e/labels/round-1.jsonl")
    assert not store.exists("runs/weak-e2e/labels/round-2.json")
    record = train_weak(config, stack_settings, on_round=lambda r, rec: rounds.append(r))
    assert rounds == [0, 1, 2] and record["epoch"] == 4
    assert store.get("runs/weak-e2e/labels/round-1.jsonl") == first
    for r in (1, 2):
        parts = sorted(store.list(f"runs/weak-e2e/labels/round-{r}/parts/"))
        predicted = [json.loads(s) for key in parts for s in store.get(key).decode().splitlines()]
        assert len(parts) == (len(canvases) + 1) // 2  # two canvases per task
        expected = {f"datasets/weak-e2e/{json.loads(c)['image']}" for c in canvases}
        assert {p["key"] for p in predicted} == expected  # every canvas, by the worker
        assert all(p["crops"] for p in predicted)
        lines = [
            json.loads(s)
            for s in store.get(f"runs/weak-e2e/labels/round-{r}.jsonl").decode().splitlines()
        ]
        stats = json.loads(store.get(f"runs/weak-e2e/labels/round-{r}.json"))
        assert len(lines) == stats["images"] == len(canvases)
        for line in lines:
            for crop in line["crops"]:  # curated: near the region, and within the canvas
                assert 0 <= crop["box"][0] < crop["box"][2] <= line["width"]
