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
    MID_BLOCK,
    MID_DIM,
    TOKEN_DIM,
    OnnxNetwork,
    PretrainedEncoder,
    TorchNetwork,
    build_pretrained_encoder,
    embedding_from_features,
    fit_search_projection,
    load_efficientnet_lite0,
    paired_state_dict,
    pixels,
    read_projection,
    search_vectors,
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
    assert got[0].shape == (len(photos), FEATURE_DIM, 8, 8)
    assert got[1].shape == (len(photos), MID_DIM, 4, 4)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    # The head map is timm's own `forward_features`, and the mid map its block 4, averaged.
    with torch.no_grad():
        pixels_t = torch.from_numpy(batch)
        np.testing.assert_allclose(expected[0], network.forward_features(pixels_t), atol=1e-5)
        x = network.bn1(network.conv_stem(pixels_t))
        for block in network.blocks[: MID_BLOCK + 1]:
            x = block(x)
        np.testing.assert_allclose(expected[1], torch.nn.functional.avg_pool2d(x, 4), atol=1e-5)
    # Runs of `chunk` photos, the last one short, give what one run gives.
    one_run = OnnxNetwork(chunk=len(photos))(batch)
    for a, b in zip(OnnxNetwork(chunk=3)(batch), one_run, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


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
    mid = rng.random((2, MID_DIM, 4, 4)).astype(np.float32)
    projection = read_projection()
    embedding = embedding_from_features(fmap, mid, projection)
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
    from safetensors.numpy import load_file, save_file

    from services.embedder.pretrained import fit_projection

    cells = np.random.default_rng(0).standard_normal((500, 40)).astype(np.float32)
    fitted = fit_projection(cells, dim=5)
    save_file(fitted, str(tmp_path / "p.safetensors"))
    stored = load_file(str(tmp_path / "p.safetensors"))
    np.testing.assert_array_equal(stored["components"], fitted["components"])
    gram = stored["components"].T @ stored["components"]
    np.testing.assert_allclose(gram, np.eye(5), atol=1e-5)  # orthonormal directions


def test_shipped_projection_is_orthonormal() -> None:
    components = read_projection()["components"]
    assert components.shape == (FEATURE_DIM, TOKEN_DIM)
    np.testing.assert_allclose(components.T @ components, np.eye(TOKEN_DIM), atol=1e-4)


def _maps(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random head cells (n, 64, 1280) and mid maps (n, 112, 4, 4) whose channels differ in scale
    (as a network's do), with a shared layout pattern scaled per photo."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 1.5, FEATURE_DIM))
    features = rng.standard_normal((n, 64, FEATURE_DIM)) * scale + 3.0
    mid = rng.standard_normal((n, MID_DIM, 4, 4)) * np.exp(rng.normal(0, 1.5, (MID_DIM, 1, 1)))
    return features.astype(np.float32), mid.astype(np.float32)


def test_search_projection_fits_what_it_documents() -> None:
    features, mid = _maps(300, 0)
    p = fit_search_projection(features, mid, cell_dim=16, dim=24)
    np.testing.assert_allclose(p["head_mean"], features.mean((0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p["head_std"], features.std((0, 1)), rtol=1e-3)
    mid_cells = mid.reshape(300, MID_DIM, 16).transpose(0, 2, 1)
    np.testing.assert_allclose(p["mid_std"], mid_cells.std((0, 1)), rtol=1e-3)
    for name, dim in (("head_cells", 16), ("vector_components", 24)):
        directions = p[name].astype(np.float64)
        assert directions.shape[1] == dim and all(v.flags["C_CONTIGUOUS"] for v in p.values())
        np.testing.assert_allclose(directions.T @ directions, np.eye(dim), atol=1e-4)
    vectors = search_vectors(features, mid, p)
    assert vectors.shape == (300, 24) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Centred: the fitted photos' vectors do not share one direction.
    assert np.linalg.norm(vectors.mean(0)) < 0.2


def test_search_vectors_weigh_every_channel_and_the_mid_map() -> None:
    """Standardised channels: a copy of a photo whose loudest head channel changed stays nearer
    to it than a photo that agrees with it in that channel only; and the mid map moves the vector."""
    features, mid = _maps(200, 1)
    loud = 7
    features[..., loud] *= 1000.0  # one channel far louder than the rest, as in real maps
    p = fit_search_projection(features, mid)
    photo, copy, other = features[:1], features[:1].copy(), features[1:2].copy()
    copy[..., loud] = features[2:3, :, loud]  # the copy: another photo's loud channel
    other[..., loud] = photo[..., loud]  # another photo: this one's loud channel
    vectors = [search_vectors(f, mid[:1], p)[0] for f in (photo, copy, other)]
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    assert float(vectors[0] @ search_vectors(photo, mid[1:2], p)[0]) < 0.99


def test_shipped_search_projection_has_the_encoder_dims() -> None:
    p = read_projection()
    assert p["head_cells"].shape == (FEATURE_DIM, 128)
    assert p["vector_components"].shape == (16 * 128 + 16 * MID_DIM, 256)


def test_a_projection_file_without_the_search_statistics_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    old = {k: v for k, v in read_projection().items() if k in ("mean", "components")}
    save_file(old, str(tmp_path / "old.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lacks head_cells.*build_encoder"):
        read_projection(tmp_path / "old.safetensors")
