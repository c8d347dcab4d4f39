"""ONNX Runtime sessions run a batch a few rows at a time.

On a CPU a large run buys nothing (the rows are computed one after another anyway) and costs
much: its activations outgrow the caches and, without the arena, are mapped and zero-filled
afresh on every run. Both ONNX graphs of `procrop crop` (the encoder, the crop network) run
their batches through `run_in_chunks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def run_in_chunks(
    session: Any, outputs: list[str] | None, feeds: dict[str, np.ndarray], chunk: int
) -> list[np.ndarray]:
    """`session.run(outputs, feeds)` over `chunk` rows of the feeds at a time, its outputs
    joined along the batch axis (an empty batch is one run, as ONNX Runtime answers it)."""
    size = len(next(iter(feeds.values())))
    runs = [
        session.run(outputs, {name: value[i : i + chunk] for name, value in feeds.items()})
        for i in range(0, max(size, 1), chunk)
    ]
    return [
        parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in zip(*runs, strict=True)
    ]
