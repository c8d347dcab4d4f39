"""Checkpoints round trip through a local object store; bad ones fail with ModelLoadError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet

from services.cropper.backbone import ResNetBackbone, build_backbone, load_resnet_weights
from services.cropper.checkpoint import (
    CONFIG,
    WEIGHTS,
    load_checkpoint,
    open_location,
    read_config,
    read_trainer_state,
    save_checkpoint,
)
from services.cropper.config import ModelConfig, profile_config
from services.cropper.model import CropInputs, ProCrop, build_model
from shared.errors import ModelLoadError, ProCropError
from shared.storage import LocalObjectStore


def seeded_model(config: ModelConfig, seed: int) -> ProCrop:
    """A model whose every weight (box head and batch-norm statistics included) depends on seed."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.01)
    return model.eval()


def inputs_for(config: ModelConfig) -> CropInputs:
    g = torch.Generator().manual_seed(7)
    k, size = config.k, config.input_size
    inputs = CropInputs(torch.randn(2, 3, size, size, generator=g), torch.tensor([0.3, -0.2]))
    if config.cue_channels:
        inputs.cues = torch.randn(2, 64, config.cue_channels, generator=g)
    inputs.tokens = torch.randn(2, k, 64, config.token_dim, generator=g)
    inputs.boxes = torch.rand(2, k, 4, generator=g) * 0.4 + 0.3
    inputs.box_mask = torch.ones(2, k, dtype=torch.bool)
    if config.use_text:
        inputs.text = torch.randn(2, 4, config.text_dim, generator=g)
        inputs.text_mask = torch.ones(2, 4, dtype=torch.bool)
    return inputs


def forward(model: ProCrop, inputs: CropInputs) -> dict:
    with torch.no_grad():
        return model.eval()(inputs)


# --- model checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "prefix"), [("lite", ""), ("tiny", "checkpoints/run-1/best")])
def test_round_trip(tmp_path: Path, name: str, prefix: str) -> None:
    config = profile_config(name)
    model = seeded_model(config, seed=1)
    store = LocalObjectStore(tmp_path)
    save_checkpoint(store, prefix, model, info={"epoch": 4, "iou": 0.71})
    loaded, info = load_checkpoint(store, prefix)
    assert loaded.config == config and info == {"epoch": 4, "iou": 0.71}
    assert not loaded.training
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    inputs = inputs_for(config)
    before, after = forward(model, inputs), forward(loaded, inputs)
    assert torch.equal(before["logits"], after["logits"])
    assert torch.equal(before["boxes"], after["boxes"])
    # The comparison means something: a model with other weights answers differently.
    assert not torch.equal(forward(seeded_model(config, seed=2), inputs)["logits"], after["logits"])


def test_read_config_through_open_location(tmp_path: Path) -> None:
    config = profile_config("tiny", num_queries=5, use_text=False)
    store, prefix = open_location(str(tmp_path / "ckpt"))
    assert prefix == "" and isinstance(store, LocalObjectStore)
    save_checkpoint(store, prefix, build_model(config))
    assert read_config(store, prefix) == (config, {})
    assert sorted(store.list()) == [CONFIG, WEIGHTS]  # no trainer state unless asked


def test_s3_location_needs_s3_settings() -> None:
    with pytest.raises(ProCropError, match="PROCROP_STORAGE__BACKEND=s3"):
        open_location("s3://bucket/checkpoints/a")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no crop model"):
        load_checkpoint(LocalObjectStore(tmp_path / "nowhere"), "")


def test_weights_of_another_config_do_not_load(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    save_checkpoint(store, "", build_model(profile_config("tiny")))
    data = json.loads(store.get(CONFIG))
    data["model"]["num_queries"] = 6  # the saved anchors have 8 rows
    store.put(CONFIG, json.dumps(data).encode())
    with pytest.raises(ModelLoadError, match="do not match") as caught:
        load_checkpoint(store, "")
    assert "anchors" in str(caught.value)


def test_missing_weights(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    save_checkpoint(store, "m", build_model(profile_config("tiny")))
    store.delete(f"m/{WEIGHTS}")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_checkpoint(store, "m")


def test_unreadable_weights(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    save_checkpoint(store, "", build_model(profile_config("tiny")))
    store.put(WEIGHTS, b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_checkpoint(store, "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a procrop-crop-model-v1 config"),
        (b'{"format": "something-else", "model": {}}', "not a procrop-crop-model-v1 config"),
        (b'{"format": "procrop-crop-model-v1", "model": {"layers": 3}}', "unknown model config"),
        (b'{"format": "procrop-crop-model-v1", "model": {"backbone": "vgg"}}', "unknown backbone"),
    ],
)
def test_corrupt_config(tmp_path: Path, text: bytes, message: str) -> None:
    store = LocalObjectStore(tmp_path)
    save_checkpoint(store, "", build_model(profile_config("tiny")))
    store.put(CONFIG, text)
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(store, "")


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(profile_config("tiny", use_text=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    out = model(inputs_for(model.config))
    (out["logits"].sum() + out["boxes"].sum()).backward()
    optimizer.step()
    scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 3}
    store = LocalObjectStore(tmp_path)
    save_checkpoint(store, "run", model, trainer_state=state)
    back = read_trainer_state(store, "run")
    assert back is not None and back["epoch"] == 3 and back["scheduler"] == state["scheduler"]
    resumed = torch.optim.AdamW(build_model(model.config).parameters(), lr=1e-3)
    resumed.load_state_dict(back["optimizer"])
    for key, saved in optimizer.state_dict()["state"].items():
        got = resumed.state_dict()["state"][key]
        assert all(torch.equal(saved[n], got[n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    assert resumed.param_groups[0]["lr"] == pytest.approx(5e-4)
    save_checkpoint(store, "other", model)
    assert read_trainer_state(store, "other") is None


# --- backbone weights -------------------------------------------------------------------------


def tiny_resnet_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision state dict of the `resnet_tiny` body (BasicBlock x [1, 1, 1, 1])."""
    torch.manual_seed(seed)
    body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    state = body.state_dict()
    for key, tensor in state.items():  # non-trivial batch-norm statistics
        if "running" in key:
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    return state


def body_state(backbone: ResNetBackbone) -> dict[str, torch.Tensor]:
    """The backbone's tensors under torchvision's names (conv1.weight, layer1.0..., ...)."""
    names = dict(
        enumerate(n for n, _ in resnet.ResNet(resnet.BasicBlock, [1] * 4).named_children())
    )
    state = backbone.body.state_dict()
    return {f"{names[int(k.split('.', 1)[0])]}.{k.split('.', 1)[1]}": v for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_weights_from_a_file(tmp_path: Path, suffix: str) -> None:
    state = tiny_resnet_state(seed=3)
    path = tmp_path / f"resnet_tiny{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    config = profile_config("tiny", backbone_weights=str(path))
    backbone = build_backbone(config, load_weights=True)
    loaded = body_state(backbone)
    # Frozen batch norm keeps no `num_batches_tracked`; the classifier is dropped.
    expected = {
        k: v for k, v in state.items() if "num_batches" not in k and not k.startswith("fc.")
    }
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # Weights are read only when asked (a checkpoint brings its own).
    untouched = body_state(build_backbone(config, load_weights=False))
    assert not torch.equal(untouched["conv1.weight"], expected["conv1.weight"])


def test_resnet18_weights_do_not_fit_resnet_tiny(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.resnet18(weights=None).state_dict(), path)
    config = profile_config("tiny", backbone_weights=str(path))
    with pytest.raises(ModelLoadError, match="do not fit resnet_tiny: 0 missing, 48 unexpected"):
        build_backbone(config, load_weights=True)


def test_mis_shaped_backbone_weights(tmp_path: Path) -> None:
    state = tiny_resnet_state(seed=0)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grey-scale stem
    path = tmp_path / "grey.pth"
    torch.save(state, path)
    body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    with pytest.raises(
        ModelLoadError, match=r"do not fit resnet_tiny: 1 mis-shaped \(e.g. conv1.weight\)"
    ):
        load_resnet_weights(body, "resnet_tiny", str(path))


@pytest.mark.parametrize("name", ["missing.pth", "garbage.pth", "garbage.safetensors"])
def test_unreadable_backbone_weights(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.startswith("garbage"):
        path.write_bytes(b"\x00 definitely not weights")
    body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    with pytest.raises(
        ModelLoadError, match="not found" if name.startswith("missing") else "cannot read"
    ):
        load_resnet_weights(body, "resnet_tiny", str(path))
