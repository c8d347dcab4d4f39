"""Device selection for workers. `resolve_device` imports torch; `cuda_visible` does not, so the
ONNX crop path can decide on its runtime without paying torch's start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ModelLoadError

if TYPE_CHECKING:
    import torch


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is visible to this process, without importing torch."""
    return Path("/dev/nvidia0").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


def resolve_device(device: str | torch.device) -> torch.device:
    """Pick a torch device: "auto" -> cuda when available, else cpu; else `torch.device(device)`.

    Raises:
        ValueError: `device` is not a device name torch knows.
        ModelLoadError: a CUDA device this process cannot use (torch would fail later, at the
            first tensor moved there, with a traceback).
    """
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown torch device {device!r}: {exc}") from None
    if picked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (picked.index or 0) >= count:
            raise ModelLoadError(
                f"device {device!r} asked for, but torch sees {count} CUDA devices"
            )
    return picked


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on CUDA (half the memory, tensor cores), float32 elsewhere; or the one named.

    Raises:
        ValueError: `name` is not auto, float16 or float32.
    """
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in ("float16", "float32"):
        raise ValueError(f"expected dtype auto, float16 or float32, got {name!r}")
    return torch.float16 if name == "float16" else torch.float32
