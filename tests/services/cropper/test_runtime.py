"""Runners: ONNX Runtime for a bundle on a CPU, torch otherwise, and the same proposals from both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from services.cropper.checkpoint import save_checkpoint
from services.cropper.config import profile_config
from services.cropper.model import build_model
from services.cropper.runtime import (
    INT8_FILE,
    INT8_TOLERANCE,
    ONNX_FILE,
    OnnxRunner,
    TorchRunner,
    build_runner,
    example_arrays,
    export_onnx,
    optimize_onnx,
    quantize_onnx,
    rank_proposals,
)
from shared.errors import ModelLoadError, ProCropError
from shared.storage import LocalObjectStore


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A checkpoint folder with its ONNX export (a tiny random lite model)."""
    folder = tmp_path_factory.mktemp("bundle")
    config = profile_config("lite", hidden_dim=32, num_heads=2, ffn_dim=64, k=3, num_queries=6)
    model = build_model(config).eval()
    save_checkpoint(LocalObjectStore(folder), "", model)
    assert export_onnx(model, folder / ONNX_FILE, example_arrays(config)) < 1e-4
    return folder


def test_rank_proposals_sorts_and_clips() -> None:
    logits = np.array([[0.0, 3.0, -2.0]])
    boxes = np.array([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 1.4, 1.0], [0.1, 0.1, 0.4, 0.4]]])
    scores, xyxy = rank_proposals(logits, boxes)
    assert np.all(np.diff(scores[0]) <= 0)
    np.testing.assert_allclose(xyxy[0, 0], [0.0, 0.0, 1.0, 1.0])  # the best box, clipped
    np.testing.assert_allclose(xyxy[0, 2], [0.0, 0.0, 0.3, 0.3])


def test_auto_picks_onnx_on_a_cpu_and_torch_on_request(bundle: Path) -> None:
    onnx = build_runner(str(bundle))
    torch_runner = build_runner(str(bundle), runtime="torch")
    assert isinstance(onnx, OnnxRunner) and isinstance(torch_runner, TorchRunner)
    arrays = example_arrays(onnx.config, batch=7, seed=4)
    (s1, b1), (s2, b2) = onnx(arrays), torch_runner(arrays)
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    np.testing.assert_allclose(b1, b2, atol=1e-4)
    # ONNX Runtime runs the batch in chunks (7 = 3 + 3 + 1): the same proposals, in order.
    s3, b3 = OnnxRunner(bundle / ONNX_FILE, onnx.config, chunk=3)(arrays)
    np.testing.assert_allclose(s3, s2, atol=1e-4)
    np.testing.assert_allclose(b3, b2, atol=1e-4)


def test_the_int8_graph_is_run_where_the_bundle_has_one(tmp_path: Path) -> None:
    """`quantize_onnx` writes the int8 graph and measures it against the float one; a bundle
    with it runs it on ONNX Runtime unless told not to, and its proposals stay close. (A model
    of the shipped kind, on feature cells, with all weights drawn so that every one counts: a
    fresh model's box head starts at zero and its boxes are the anchors.)"""
    import torch

    config = profile_config(
        "lite-effnet", hidden_dim=32, num_heads=2, ffn_dim=64, k=3, num_queries=6, cue_channels=64
    )
    model = build_model(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    save_checkpoint(LocalObjectStore(tmp_path), "", model)
    example = example_arrays(config)
    assert export_onnx(model, tmp_path / ONNX_FILE, example) < 1e-4
    error = quantize_onnx(tmp_path / ONNX_FILE, tmp_path / INT8_FILE, example)
    assert 0 < error < INT8_TOLERANCE  # int8 weights: near the float graph, not the same
    assert "DynamicQuantizeMatMul" in _fused(tmp_path / INT8_FILE)  # stored optimized
    quantized, exact = build_runner(str(tmp_path)), build_runner(str(tmp_path), quantized=False)
    assert isinstance(quantized, OnnxRunner) and isinstance(exact, OnnxRunner)
    assert quantized.session._model_path.endswith(INT8_FILE)
    assert exact.session._model_path.endswith(ONNX_FILE)
    arrays = example_arrays(config, batch=5, seed=9)
    b1, b2 = (r.session.run(["pred_boxes"], arrays)[0] for r in (quantized, exact))  # unranked
    assert 0 < np.abs(b1 - b2).max() < INT8_TOLERANCE
    # A photo's proposals do not depend on the photos batched with it (int8 activations are
    # scaled by the range of a run: the runner runs one photo at a time).
    together = quantized(arrays)
    for i in range(5):
        alone = quantized({name: value[i : i + 1] for name, value in arrays.items()})
        np.testing.assert_array_equal(alone[1][0], together[1][i])


def _node_count(path: Path) -> int:
    return len(onnx.load(str(path)).graph.node)


def _fused(path: Path) -> set[str]:
    """The graph's operators of ONNX Runtime's own domain (its fusions: FusedConv, ...)."""
    return {n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"}


def test_graphs_are_stored_optimized(bundle: Path, tmp_path: Path) -> None:
    """`optimize_onnx` rewrites a graph with ONNX Runtime's optimizations done: fewer nodes, the
    same outputs, and nothing left to do (a second pass changes nothing)."""
    path = tmp_path / ONNX_FILE
    path.write_bytes((bundle / ONNX_FILE).read_bytes())
    config = build_runner(str(bundle), runtime="onnx").config
    example = example_arrays(config, batch=3, seed=4)
    plain = ort.InferenceSession(str(bundle / ONNX_FILE), providers=["CPUExecutionProvider"])
    before = _node_count(path)
    assert not _fused(path)
    assert optimize_onnx(path, example) < 1e-5
    after = _node_count(path)
    assert after < before and {"FusedConv", "FusedMatMul"} <= _fused(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    stored = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for a, b in zip(plain.run(None, example), stored.run(None, example), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert optimize_onnx(path, example) < 1e-6
    assert _node_count(path) == after


def test_onnx_without_an_export_is_an_error(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((bundle / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
    with pytest.raises(ProCropError, match=r"has no model\.onnx"):
        build_runner(str(tmp_path), runtime="onnx")
    assert isinstance(build_runner(str(tmp_path)), TorchRunner)


def test_onnx_graph_of_another_config_is_refused(bundle: Path) -> None:
    other = profile_config("lite", hidden_dim=32, num_heads=2, ffn_dim=64, k=3, num_queries=9)
    with pytest.raises(ModelLoadError, match="does not match the model config"):
        OnnxRunner(bundle / ONNX_FILE, other)


def test_unreadable_onnx_file(tmp_path: Path, bundle: Path) -> None:
    (tmp_path / ONNX_FILE).write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="unreadable ONNX model"):
        OnnxRunner(tmp_path / ONNX_FILE, build_runner(str(bundle)).config)
