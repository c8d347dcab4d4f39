"""Torch device selection for workers (imports torch: never import this from the gateway)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """Pick a torch device: "auto" -> cuda when available, else cpu; else `torch.device(device)`.

    Raises:
        ValueError: `device` is not a device name torch knows.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown torch device {device!r}: {exc}") from None
