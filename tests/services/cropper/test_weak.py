"""Weak supervision on CAD, in one process: a CAD run of six photos with the lite out-painter,
stage 1 and two pseudo-label rounds of a tiny model, interrupted after round 1 and resumed; the
schedule, the views relabelled per round, and the per-source draw weights of mixed training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.cropper.data import TrainPhoto
from services.cropper.train import load_train_config, train
from services.cropper.views import draw_view
from services.cropper.weak import WeakConfig, schedule
from services.cropper.weak_data import relabel_views, sampling_weights
from shared.errors import ProCropError
from shared.settings import Settings
from tests.tiny_crop_model import TINY_MODEL_TOML

TINY = (
    TINY_MODEL_TOML
    + """
[train]
epochs = 5
batch_size = 4
warmup_steps = 1
lr = 1e-3
out = "{out}"

[weak]
sources = ["{cad}"]
rounds = 2
k = 4
min_region_iou = 0.5
"""
)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def cad_run(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CAD run of the six sample photos (lite out-painter, 1 variant), all items labelled."""
    import os

    from services.outpainter.pipeline import build_pipeline
    from services.outpainter.run import RunParams, run_embedded
    from shared.settings import load_settings
    from shared.storage import LocalObjectStore

    out = tmp_path_factory.mktemp("cad")
    os.environ["PROCROP_HOME"] = str(out / "home")
    try:
        settings = load_settings()
        run_embedded(RunParams(str(photo_dir), variants=1), build_pipeline(settings),
                     LocalObjectStore(out), settings)  # fmt: skip
    finally:
        del os.environ["PROCROP_HOME"]
    return out


def _config(tmp_path: Path, cad: Path, extra: str = "") -> Path:
    path = tmp_path / "weak.toml"
    path.write_text(TINY.format(out=tmp_path / "run", cad=cad) + extra)
    return path


@pytest.mark.slow
def test_two_rounds_resume_after_an_interruption(
    cad_run: Path, tmp_path: Path, settings: Settings
) -> None:
    config = load_train_config(_config(tmp_path, cad_run))
    labels = [json.loads(s) for s in (cad_run / "labels.jsonl").read_text().splitlines()]
    assert len(labels) >= 3
    rounds: list[int] = []

    def stop_after_round_1(r: int, record: dict) -> None:
        rounds.append(r)
        if r == 1:
            raise Interrupted

    from services.cropper.weak import train_weak

    with pytest.raises(Interrupted):
        train_weak(config, settings, on_round=stop_after_round_1)
    run = tmp_path / "run"
    first = (run / "labels" / "round-1.jsonl").read_bytes()
    assert not (run / "labels" / "round-2.jsonl").exists()
    record = train_weak(config, settings, on_round=lambda r, rec: rounds.append(r))
    assert rounds == [0, 1, 2] and record["epoch"] == 5  # resumed in round 2, not from scratch
    assert (run / "labels" / "round-1.jsonl").read_bytes() == first  # read back, not remade
    assert list(record["rounds"]) == [2]
    for r in (1, 2):
        stats = json.loads((run / "labels" / f"round-{r}.json").read_text())
        lines = [
            json.loads(s) for s in (run / "labels" / f"round-{r}.jsonl").read_text().splitlines()
        ]
        assert stats["images"] == len(lines) == len(labels)
        assert all(len(line["crops"]) <= 4 for line in lines)
        assert stats["mean_labels"] == pytest.approx(np.mean([len(x["crops"]) for x in lines]))
    # A round file is itself JSON-lines training data.
    from shared.annotations import load_jsonl

    assert len(load_jsonl(run / "labels" / "round-2.jsonl", run / "weak")) <= len(labels)


@pytest.mark.slow
def test_train_dispatches_on_weak(cad_run: Path, tmp_path: Path, settings: Settings) -> None:
    path = _config(tmp_path, cad_run)
    path.write_text(
        path.read_text().replace("epochs = 5", "epochs = 2").replace("rounds = 2", "rounds = 1")
    )
    record = train(load_train_config(path), settings)
    assert record["epoch"] == 2 and record["round"] == 1


def test_schedule() -> None:
    assert schedule(10, 0.2, 2) == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert schedule(8, 0.2, 3) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert schedule(3, 0.2, 2) == [0, 1, 2]  # at least one stage-1 epoch
    with pytest.raises(ProCropError, match="fewer than one per round"):
        schedule(3, 0.2, 3)


def test_config_errors() -> None:
    with pytest.raises(ProCropError, match="one per source"):
        WeakConfig.from_dict({"sources": ["a", "b"], "weights": [1.0]})
    with pytest.raises(ProCropError, match="predict"):
        WeakConfig.from_dict({"sources": ["a"], "predict": "gpu"})
    with pytest.raises(ValueError, match="k must be"):
        WeakConfig.from_dict({"sources": ["a"], "k": 12})


def test_mixed_sources_are_drawn_by_their_weights() -> None:
    config = WeakConfig.from_dict({"sources": ["a", "b"], "weights": [1.0, 3.0], "human": True,
                                   "human_weight": 2.0})  # fmt: skip
    names = (
        [f"s0/{i}" for i in range(50)]
        + [f"s1/{i}" for i in range(50)]
        + [f"h/{i}" for i in range(100)]
    )
    source_of = {n: n.split("/")[0] for n in names}
    draw = sampling_weights(names, source_of, config.source_weights())
    sampler = torch.utils.data.WeightedRandomSampler(
        draw.tolist(), 60000, generator=torch.Generator().manual_seed(0)
    )
    drawn = np.bincount(
        [{"s0": 0, "s1": 1, "h": 2}[source_of[names[i]]] for i in sampler], minlength=3
    )
    expected = np.array([50 * 1.0, 50 * 3.0, 100 * 2.0]) / 400
    np.testing.assert_allclose(drawn / drawn.sum(), expected, atol=0.01)


def test_relabelled_views_hold_the_labels_where_the_windows_put_them() -> None:
    """Each view's relabelled crops equal the labels drawn into that view directly."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8))
    region = np.array([[0.3, 0.25, 0.7, 0.75]])
    photo = TrainPhoto("a", image, region, np.ones(1))
    drawn = [draw_view(photo, 0, v, 0, 0.9, 0.5) for v in range(8)]
    from services.cropper.views import ViewCache

    views = ViewCache(np.zeros((1, 8, 1, 1)), [[c for _, c, _ in drawn]],
                      np.array([[f for _, _, f in drawn]]), np.zeros((1, 8)))  # fmt: skip
    labels = np.array([[0.32, 0.26, 0.68, 0.74], [0.3, 0.25, 0.7, 0.75]])
    relabelled = relabel_views(views, [0], [labels])
    both = dataclasses.replace(photo, crops=np.concatenate([region, labels]))
    for v in range(8):
        _, direct, _ = draw_view(both, 0, v, 0, 0.9, 0.5)
        if v and not np.allclose(direct[0], drawn[v][1][0], atol=1e-9):
            continue  # the hull changed the draw: compare only windows that stayed the same
        np.testing.assert_allclose(relabelled.crops[0][v], direct[1:], atol=0.02)
