"""`CropPredictor`, the one way photos become crops: the CLI's batched path, the crop worker's
precomputed path and one photo at a time all give the same crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.cropper.config import profile_config
from services.cropper.model import build_model
from services.cropper.postprocess import CropRequest
from services.cropper.predictor import CropPredictor
from services.cropper.runtime import TorchRunner
from services.embedder.lite import LiteCompositionEncoder
from services.retriever.neighbors import neighbors_from

K = 3


class TableRetrieval:
    """Retrieval over a fixed table: neighbour i of every query is row i; records the queries."""

    k = K

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.tokens = rng.standard_normal((K, 64, 16)).astype(np.float32)
        self.crops = [[0.1, 0.1, 0.9, 0.8], None, [0.0, 0.2, 0.7, 1.0]]
        self.asked: list[str | None] = []

    def neighbors(self, vectors, hashes):
        self.asked += list(hashes)
        return [neighbors_from(self.tokens, self.crops, K) for _ in hashes]


@pytest.fixture(scope="module")
def predictor() -> CropPredictor:
    config = profile_config("lite", hidden_dim=32, num_heads=2, ffn_dim=64, k=K, num_queries=8)
    model = build_model(config)
    return CropPredictor(
        TorchRunner(model), LiteCompositionEncoder(), TableRetrieval(), batch_size=2
    )


@pytest.fixture(scope="module")
def images(photo_dir: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photo_dir.glob("*.jpg"))[:3]]


def test_batched_equals_one_at_a_time(predictor, images) -> None:
    request = CropRequest.parse(3, ["16:9"])
    together = predictor.crop(images, ["a", "b", "c"], request)
    alone = [predictor.crop([im], [h], request)[0] for im, h in zip(images, "abc", strict=True)]
    assert [r.to_dict() for r in together] == [r.to_dict() for r in alone]
    assert predictor.retrieval.asked[:3] == ["a", "b", "c"]  # hashes reach the search


def test_worker_path_equals_cli_path(predictor, images) -> None:
    """The crop worker's inputs come from the embed and retrieve stages: same crops."""
    request = CropRequest.parse(4)
    [prepared] = predictor.prepare(images[:1], [None])
    [expected] = predictor.crop_prepared([prepared], request)
    tokens = predictor.encoder.encode(images[:1]).tokens[0]
    [found] = predictor.neighbors([prepared])
    got = predictor.crop_precomputed(images[0], tokens, found, None, request)
    assert got.to_dict() == expected.to_dict()
    assert 1 <= len(got.crops) <= 4
    for crop in got.crops:
        x1, y1, x2, y2 = crop.box
        assert 0 <= x1 < x2 <= images[0].width and 0 <= y1 < y2 <= images[0].height


def test_ratio_request_gives_n_per_ratio_at_that_ratio(predictor, images) -> None:
    [result] = predictor.crop(images[:1], [None], CropRequest.parse(2, ["1:1", "3:2"]))
    by_ratio = {r: [c for c in result.crops if c.aspect_ratio == r] for r in ("1:1", "3:2")}
    assert all(len(crops) == 2 for crops in by_ratio.values())
    for crop in by_ratio["3:2"]:
        x1, y1, x2, y2 = crop.box
        assert (x2 - x1) * 2 == (y2 - y1) * 3
    # Every ratio's best first (the better scored first), then every ratio's second.
    assert {c.aspect_ratio for c in result.crops[:2]} == {"1:1", "3:2"}
    assert result.crops[0].score >= result.crops[1].score
    assert all(crops[0].score >= crops[1].score for crops in by_ratio.values())  # NMS: by score


def test_missing_inputs_are_refused(predictor, images) -> None:
    request = CropRequest.parse(1)
    bare = CropPredictor(predictor.runner)
    with pytest.raises(ValueError, match="no composition encoder"):
        bare.prepare(images[:1], [None])
    tokens = np.zeros((64, 16), np.float32)
    with pytest.raises(ValueError, match="none were retrieved"):
        bare.crop_precomputed(images[0], tokens, None, None, request)
    with pytest.raises(ValueError, match="give it a retrieval"):
        CropPredictor(predictor.runner, LiteCompositionEncoder())
    assert bare.crop_prepared([], request) == []


@pytest.mark.parametrize(
    ("n", "ratios", "message"),
    [(0, [], "n must be"), (101, [], "n must be"), (1, ["0:1"], "aspect ratio"), (1, ["x"], "W:H")],
)
def test_bad_requests_name_what_is_wrong(n, ratios, message) -> None:
    with pytest.raises(ValueError, match=message):
        CropRequest.parse(n, ratios)


def test_cover_alternatives_keeps_the_top_crop_and_covers_the_neighbours_crops(images) -> None:
    """With `cover_alternatives` the first crop is unchanged and the alternatives cover the
    retrieved crops at least as well as the next best scored; raw requests ignore it."""
    import dataclasses

    from services.cropper.pseudo_labels import round_request
    from shared.boxes import box_iou

    config = profile_config(
        "lite", hidden_dim=32, num_heads=2, ffn_dim=64, k=K, num_queries=8, transfer_weight=0.5
    )
    samples = np.asarray([c for c in TableRetrieval().crops if c is not None])

    def coverage(result, size: np.ndarray) -> float:
        boxes = np.asarray([c.box for c in result.crops[:3]], np.float64) / size
        return float(box_iou(boxes, samples).max(0).mean())

    changed = 0
    for seed in range(4):  # untrained models: whether the order changes depends on their weights
        torch.manual_seed(seed)
        model = build_model(config)
        plain = CropPredictor(TorchRunner(model), LiteCompositionEncoder(), TableRetrieval())
        runner = TorchRunner(model)
        runner.config = dataclasses.replace(config, cover_alternatives=True)
        covering = CropPredictor(runner, LiteCompositionEncoder(), TableRetrieval())
        request = CropRequest.parse(8)  # every proposal: what changes is which come first
        for image in images:
            [before], [after] = (p.crop([image], [None], request) for p in (plain, covering))
            assert after.crops[0] == before.crops[0]
            size = np.tile(image.size, 2)
            assert coverage(after, size) >= coverage(before, size) - 1e-3  # pixel rounding
            changed += after.to_dict() != before.to_dict()
            [raw], [raw_plain] = (
                p.crop([image], [None], round_request(8)) for p in (covering, plain)
            )
            assert raw.to_dict() == raw_plain.to_dict()
    assert changed  # the test would not see a selection that did nothing


def test_transfer_weight_moves_only_the_top_crop_toward_the_neighbours_median(images) -> None:
    """With `transfer_weight` 0.5 the first crop is the mean of the model's best proposal and
    the neighbours' median crop (both normalized); 0 leaves the model's crops as they were."""
    import dataclasses

    from shared.boxes import median_box

    config = profile_config("lite", hidden_dim=32, num_heads=2, ffn_dim=64, k=K, num_queries=8)
    model = build_model(config)
    plain = CropPredictor(TorchRunner(model), LiteCompositionEncoder(), TableRetrieval())
    runner = TorchRunner(model)
    runner.config = dataclasses.replace(config, transfer_weight=0.5)  # post-processing only
    fused = CropPredictor(runner, LiteCompositionEncoder(), TableRetrieval())
    request = CropRequest.parse(3)
    [before] = plain.crop(images[:1], [None], request)
    [after] = fused.crop(images[:1], [None], request)
    w, h = images[0].size
    median = median_box(np.asarray([c for c in TableRetrieval().crops if c is not None]))
    top = np.asarray(before.crops[0].box, np.float64) / [w, h, w, h]
    expected = (top + median) / 2 * [w, h, w, h]
    assert np.abs(np.asarray(after.crops[0].box) - expected).max() <= 1.0  # pixel rounding
    assert after.crops[0].score == before.crops[0].score
    assert np.abs(top - median).max() > 0.02  # the test would not see a fusion that did nothing
    # Pseudo-label rounds ask for the raw proposals (services/cropper/pseudo_labels.py).
    from services.cropper.pseudo_labels import round_request

    [raw] = fused.crop(images[:1], [None], round_request(3))
    [raw_plain] = plain.crop(images[:1], [None], CropRequest(3))
    assert raw.to_dict() == raw_plain.to_dict()
