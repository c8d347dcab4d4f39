"""The effnet encoder: the registry package's ImageNet weights through the real loading code, its
ONNX export equal to torch, and every way the weights can be missing or wrong is a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.embedder.pretrained import (
    FEATURE_DIM,
    TOKEN_DIM,
    OnnxNetwork,
    PretrainedEncoder,
    TorchNetwork,
    build_pretrained_encoder,
    embedding_from_features,
    load_efficientnet_lite0,
    paired_state_dict,
    pixels,
    read_projection,
    weights_path,
)
from shared.errors import ModelLoadError


@pytest.fixture(scope="module")
def network():
    torch.set_num_threads(1)
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def photos(photo_dir: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(photo_dir.glob("*.jpg"))[:4]]


def test_imagenet_weights_classify_real_photos(network, photo_dir: Path) -> None:
    """The pairing of EfficientNet-PyTorch keys with timm's is right: chelsea is a cat."""
    cat = Image.open(photo_dir / "chelsea.jpg")
    with torch.no_grad():
        logits = network(torch.from_numpy(pixels([cat], 224)))
    assert int(logits.argmax()) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian


def test_onnx_export_equals_torch(network, photos) -> None:
    batch = pixels(photos)
    expected = TorchNetwork(network)(batch)
    got = OnnxNetwork()(batch)
    assert got.shape == (len(photos), FEATURE_DIM, 8, 8)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # Runs of `chunk` photos, the last one short, give what one run gives.
    one_run = OnnxNetwork(chunk=len(photos))(batch)
    np.testing.assert_allclose(OnnxNetwork(chunk=3)(batch), one_run, atol=1e-5)


def test_embedding_shapes_norms_and_batch_independence(photos) -> None:
    encoder = build_pretrained_encoder(batch_size=2)
    together = encoder.encode(photos)
    assert together.tokens.shape == (4, 64, TOKEN_DIM)
    assert together.features.shape == (4, 64, FEATURE_DIM)
    np.testing.assert_allclose(np.linalg.norm(together.vectors, axis=1), 1.0, atol=1e-5)
    alone = encoder.encode(photos[2:3])
    np.testing.assert_allclose(alone.vectors[0], together.vectors[2], atol=1e-5)
    assert encoder.spec["encoder"] == "effnet" and encoder.spec["token_dim"] == TOKEN_DIM


def test_tokens_are_the_projection_of_the_features() -> None:
    rng = np.random.default_rng(0)
    fmap = rng.random((2, FEATURE_DIM, 8, 8)).astype(np.float32)
    projection = read_projection()
    embedding = embedding_from_features(fmap, projection)
    cell = fmap[1, :, 3, 5]  # row 3, column 5 -> token 29
    np.testing.assert_allclose(embedding.features[1, 29], cell)
    expected = (cell - projection["mean"]) @ projection["components"]
    np.testing.assert_allclose(embedding.tokens[1, 29], expected, rtol=1e-4, atol=1e-4)


def test_version_names_weights_and_projection() -> None:
    encoder = build_pretrained_encoder()
    assert isinstance(encoder, PretrainedEncoder)
    assert encoder.version.startswith("s256-t32-579344248a93-")


def test_altered_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "weights.pth"
    shutil.copyfile(weights_path(), copy)
    with copy.open("r+b") as f:
        f.seek(5000)
        f.write(b"\x00" * 16)
    from services.embedder.pretrained import WEIGHTS_SHA256

    with pytest.raises(ModelLoadError, match="altered"):
        load_efficientnet_lite0(copy, expected_sha256=WEIGHTS_SHA256)


def test_missing_and_unreadable_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_efficientnet_lite0(tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_efficientnet_lite0(tmp_path / "bad.pth")


def test_missing_package_is_a_clear_error(monkeypatch) -> None:
    import services.embedder.pretrained as pretrained

    monkeypatch.setattr(pretrained, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(ModelLoadError, match="is not installed"):
        pretrained.weights_path()


def test_weights_of_another_network_do_not_pair(network) -> None:
    target = network.state_dict()
    source = {f"k{i}": v for i, (k, v) in enumerate(target.items()) if "num_batches" not in k}
    source.pop("k3")
    with pytest.raises(ModelLoadError, match="tensors where"):
        paired_state_dict(source, target, "x.pth")
    wrong = {k: torch.zeros(1) for k in source}
    wrong["k3"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match="does not fit"):
        paired_state_dict(wrong, target, "x.pth")


def test_missing_onnx_export_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="ONNX export is missing"):
        OnnxNetwork(tmp_path / "none.onnx")


def test_fitted_projection_survives_its_file(tmp_path: Path) -> None:
    """safetensors writes a transposed view's buffer as it lies in memory: the fit must hand it
    contiguous arrays, or the stored directions are scrambled (they were, once)."""
    from safetensors.numpy import save_file

    from services.embedder.pretrained import fit_projection

    cells = np.random.default_rng(0).standard_normal((500, 40)).astype(np.float32)
    fitted = fit_projection(cells, dim=5)
    save_file(fitted, str(tmp_path / "p.safetensors"))
    stored = read_projection(tmp_path / "p.safetensors")
    np.testing.assert_array_equal(stored["components"], fitted["components"])
    gram = stored["components"].T @ stored["components"]
    np.testing.assert_allclose(gram, np.eye(5), atol=1e-5)  # orthonormal directions


def test_shipped_projection_is_orthonormal() -> None:
    components = read_projection()["components"]
    assert components.shape == (FEATURE_DIM, TOKEN_DIM)
    np.testing.assert_allclose(components.T @ components, np.eye(TOKEN_DIM), atol=1e-4)
