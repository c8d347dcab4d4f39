"""Checkpoints under an s3:// prefix of a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import torch

from services.cropper.checkpoint import (
    load_checkpoint,
    open_location,
    read_trainer_state,
    save_checkpoint,
)
from services.cropper.config import profile_config
from services.cropper.model import build_model


def test_checkpoint_round_trip_through_s3(s3_settings):
    torch.manual_seed(0)
    model = build_model(profile_config("tiny")).eval()
    location = f"s3://{s3_settings.storage.bucket}/checkpoints/tiny/last"
    store, prefix = open_location(location, s3_settings)
    assert prefix == "checkpoints/tiny/last"
    save_checkpoint(store, prefix, model, info={"epoch": 3}, trainer_state={"epoch": 3})
    loaded, info = load_checkpoint(*open_location(location, s3_settings))
    assert info == {"epoch": 3} and loaded.config == model.config
    assert read_trainer_state(store, prefix) == {"epoch": 3}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
