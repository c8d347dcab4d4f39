"""Device selection (shared/devices.py)."""

from __future__ import annotations

import pytest
import torch

from shared.devices import resolve_device
from shared.errors import ModelLoadError


def test_auto_and_named_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_a_cuda_device_this_process_cannot_use_is_one_clear_error() -> None:
    """Asking for a GPU that is not there failed later, at the first tensor moved to it, with a
    traceback from torch; now it is a ModelLoadError naming the device and what torch sees."""
    beyond = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ModelLoadError, match=rf"'{beyond}' asked for, but torch sees \d+ CUDA"):
        resolve_device(beyond)
    with pytest.raises(ValueError, match="unknown torch device"):
        resolve_device("bogus")
