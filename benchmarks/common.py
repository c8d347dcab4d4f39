"""Helpers shared by the benchmark scripts: timing statistics and JSON output."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FCDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "fcdb" / "train"


def timings_ms(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> np.ndarray:
    """Wall times of `repeat` calls of `fn`, in milliseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return np.asarray(out)


def summary(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "n": len(ms),
    }


def emit(name: str, result: dict[str, Any]) -> None:
    """Print one JSON document with the machine it ran on."""
    machine = {"python": platform.python_version(), "cpu_count": _cpus(), "platform": sys.platform}
    print(json.dumps({"benchmark": name, "machine": machine, **result}, indent=2))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
