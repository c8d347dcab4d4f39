"""Model runners: a batch of numpy inputs -> ranked proposals, on torch or on ONNX Runtime.

The shipped lite model also ships as ONNX (`model.onnx`, exported from the same weights by
`procrop bundle`), so `procrop crop` on a CPU runs without importing torch: starting torch costs
more than cropping a hundred photos. `export_onnx` checks the exported graph against torch;
`quantize_onnx` writes its int8 twin (`model.int8.onnx`, run by default where present) and
checks it against the float graph. Both are stored optimized (`optimize_onnx`), which makes
opening them 4x faster.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.cropper.config import ModelConfig, config_from_json
from shared.boxes import cxcywh_to_xyxy
from shared.devices import cuda_visible
from shared.errors import ModelLoadError, ProCropError
from shared.onnx_runs import run_in_chunks

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # the same graph, its matrix weights in int8 (`quantize_onnx`)
INT8_TOLERANCE = 0.01  # the largest box difference (fraction of the photo) from the float graph
OUTPUTS = ("pred_logits", "pred_boxes")


def rank_proposals(logits: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw model output -> proposals best first: scores (B, Q) in (0, 1), boxes (B, Q, 4)
    normalized xyxy clipped to the photo. `boxes` are the model's (B, Q, 4) cxcywh."""
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    order = np.argsort(-scores, axis=1, kind="stable")
    xyxy = np.clip(cxcywh_to_xyxy(boxes.astype(np.float64)), 0.0, 1.0)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(xyxy, order[..., None], 1)


class Runner(Protocol):
    config: ModelConfig

    def __call__(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B, Q) and normalized xyxy boxes (B, Q, 4), best first."""
        ...


def input_names(config: ModelConfig) -> list[str]:
    """The `CropInputs` fields a model of `config` reads, in a fixed order."""
    names = ["aspect"] if config.backbone == "features" else ["images", "aspect"]
    names += ["cues"] if config.cue_channels else []
    names += ["tokens", "boxes", "box_mask"] if config.use_retrieval else []
    names += ["text", "text_mask"] if config.use_text else []
    return names


class TorchRunner:
    def __init__(self, model: Any, device: Any = "cpu") -> None:
        self.model, self.device, self.config = model.to(device).eval(), device, model.config

    def __call__(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        from services.cropper.engine import predict
        from services.cropper.model import CropInputs

        return predict(self.model, CropInputs.from_arrays(arrays).to(self.device))


class OnnxRunner:
    """The model on ONNX Runtime (CPU). A batch runs `chunk` photos at a time
    (`shared.onnx_runs`; the shipped model, 2-core machine: 8.6 ms a photo in runs of 16, 7.1 in
    runs of 4 or 2; the same outputs)."""

    def __init__(
        self, path: str | Path, config: ModelConfig, threads: int = 1, chunk: int = 4
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own error types on bad files
            raise ModelLoadError(f"{path}: unreadable ONNX model ({exc})") from None
        self.config, self.names, self.chunk = config, input_names(config), chunk
        self._check(path)

    def _check(self, path: str | Path) -> None:
        """The graph's inputs and proposal count must be those of the config."""
        example = example_arrays(self.config, batch=1)
        graph = {i.name: i.shape[1:] for i in self.session.get_inputs()}
        wanted = {name: list(example[name].shape[1:]) for name in self.names}
        try:
            logits = self.session.run([OUTPUTS[0]], {n: example[n] for n in self.names})[0]
            queries = logits.shape[1]
        except Exception:  # inputs of the wrong shape for the graph: reported below
            queries = -1
        expected_q = self.config.num_queries + self.config.num_anchor_queries
        if graph != wanted or queries != expected_q:
            raise ModelLoadError(
                f"{path}: the ONNX graph does not match the model config "
                f"(inputs {graph}, {queries} proposals; config wants {wanted}, {expected_q})"
            )

    def __call__(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feeds = {n: arrays[n] for n in self.names}
        logits, boxes = run_in_chunks(self.session, list(OUTPUTS), feeds, self.chunk)
        return rank_proposals(logits, boxes)


def example_arrays(config: ModelConfig, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the right shapes for `config` (for export and its check)."""
    rng = np.random.default_rng(seed)
    s, k = config.input_size, config.k
    arrays = {
        "images": rng.standard_normal((batch, 3, s, s)).astype(np.float32),
        "aspect": rng.uniform(-0.5, 0.5, batch).astype(np.float32),
        "cues": rng.standard_normal((batch, 64, max(config.cue_channels, 1))).astype(np.float32),
        "tokens": rng.standard_normal((batch, k, 64, config.token_dim)).astype(np.float32),
        "boxes": rng.uniform(0.3, 0.7, (batch, k, 4)).astype(np.float32),
        "box_mask": rng.random((batch, k)) < 0.8,
        "text": rng.standard_normal((batch, 5, config.text_dim)).astype(np.float32),
        "text_mask": np.ones((batch, 5), bool),
    }
    return {n: arrays[n] for n in input_names(config)}


def export_onnx(model: Any, path: str | Path, example: dict[str, np.ndarray]) -> float:
    """Export `model` (eval mode) to ONNX with a dynamic batch; returns the largest difference
    of its outputs from torch's on `example`, which must be small."""
    import torch

    from services.cropper.model import CropInputs

    names = input_names(model.config)

    class _Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.model(
                CropInputs(**{"images": None, **dict(zip(names, tensors, strict=True))})  # type: ignore[arg-type]
            )
            return out["logits"], out["boxes"]

    flat = _Flat().eval()
    tensors = tuple(torch.from_numpy(example[n]) for n in names)
    dynamic = {n: {0: "batch"} for n in [*names, *OUTPUTS]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on constants; the check below is the test
        torch.onnx.export(
            flat, tensors, str(path), input_names=names, output_names=list(OUTPUTS),
            dynamic_axes=dynamic, dynamo=False, opset_version=17,
        )  # fmt: skip
        expected = [t.numpy() for t in flat(*tensors)]
    got = OnnxRunner(path, model.config).session.run(list(OUTPUTS), {n: example[n] for n in names})
    return float(max(np.abs(a - b).max() for a, b in zip(got, expected, strict=True)))


def quantize_onnx(source: str | Path, path: str | Path, example: dict[str, np.ndarray]) -> float:
    """Write `source`'s graph with its MatMul and Gemm weights in int8 (activations quantized
    on the fly: ONNX Runtime's dynamic quantization) to `path`; returns the largest difference
    of its boxes from the float graph's on `example`, which must be small.

    The shipped model (`benchmarks.bench_int8`): the network with its ranking runs 1.4-1.5x
    faster (7.6 -> 5.3-5.6 ms a photo on one core, one photo a run; the graph alone 7.1 -> 4.2),
    its graph is 2.4 MB instead of 5.6, and over 330 FCDB photos the top-1 crops of the two
    graphs overlap at a mean IoU of 0.998, 260 of them identical (their IoU with the experts'
    crops: 0.7242 against 0.7238, +0.0004 +- 0.0004)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
    )
    optimize_onnx(path, example)
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (source, path)
    ]
    float_boxes, int8_boxes = (session.run([OUTPUTS[1]], example)[0] for session in sessions)
    return float(np.abs(int8_boxes - float_boxes).max())


def optimize_onnx(path: str | Path, example: dict[str, np.ndarray]) -> float:
    """Rewrite the graph at `path` with ONNX Runtime's hardware-independent optimizations done
    (`ORT_ENABLE_EXTENDED`: constants folded, shape arithmetic simplified, matrix products fused
    with their quantization), so that opening it does not redo them every time; returns the
    largest difference of its outputs on `example` from the graph's before, which must be small.

    The shipped int8 graph has 1,896 nodes before and 828 after; opening it took 0.35 s before
    and 0.08 s after (the 2-core machine, median of 5). Layout changes that depend on the CPU
    (`ORT_ENABLE_ALL`) are still made when a session opens it."""
    import onnxruntime as ort

    path = Path(path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = path.with_name(path.name + ".optimized")
    options.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # writes tmp
    # Compared as files: the writing session runs the optimized graph too, so it cannot check it.
    before, after = (
        ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in (path, tmp)
    )
    feeds = {i.name: example[i.name] for i in before.get_inputs()}
    difference = max(
        float(np.abs(a - b).max())
        for a, b in zip(before.run(None, feeds), after.run(None, feeds), strict=True)
    )
    tmp.replace(path)
    return difference


def build_runner(
    location: str,
    runtime: str = "auto",
    device: str = "auto",
    settings: Any = None,
    quantized: bool = True,
) -> Runner:
    """The runner of the model at `location`: ONNX Runtime for a local bundle that has
    `model.onnx` when the device is a CPU (`runtime` "auto" with no GPU visible, or "onnx"),
    else torch on `device`. On ONNX Runtime the bundle's int8 graph is run where it has one,
    unless `quantized` is False. `settings` opens s3:// locations."""
    onnx = Path(location) / ONNX_FILE if "://" not in location else None
    if onnx is not None and onnx.is_file() and runtime != "torch" and device in ("auto", "cpu"):
        config, _ = config_from_json((Path(location) / "config.json").read_bytes(), location)
        if runtime == "onnx" or not cuda_visible():
            int8 = onnx.with_name(INT8_FILE)
            if quantized and int8.is_file():
                # One photo a run: int8 activations are scaled by the range of the whole run,
                # so in a run of several a photo's crops would depend on the others.
                return OnnxRunner(int8, config, chunk=1)
            return OnnxRunner(onnx, config)
    if runtime == "onnx":
        raise ProCropError(f"{location} has no {ONNX_FILE}; use PROCROP_CROP__RUNTIME=torch")
    from services.cropper.checkpoint import load_checkpoint, open_location
    from shared.devices import resolve_device

    crop_model, _ = load_checkpoint(*open_location(location, settings))
    return TorchRunner(crop_model, resolve_device(device))
