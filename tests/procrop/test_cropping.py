"""`procrop crop`'s reading pipeline (procrop/cropping.py)."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

from threadpoolctl import threadpool_info

from procrop.cropping import DECODED_AT_ONCE, PREPARE_THREADS, prepared_batches


def _blas_threads() -> int:
    """Threads of numpy's own BLAS (the wheel's OpenBLAS, pthreads: its setting is process-wide).
    Other libraries loaded in the test process may bring their own OpenBLAS, whose OpenMP setting
    is per thread; numpy's matrix products never use them."""
    ours = [p for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"]]
    assert ours, threadpool_info()
    return max(pool["num_threads"] for pool in ours)


class _Recorder:
    """Stands in for `CropPredictor.prepare`: records the BLAS threads each batch ran with."""

    batch_size = 2

    def __init__(self) -> None:
        self.threads: list[int] = []

    def prepare(self, images, hashes):
        self.threads.append(_blas_threads())
        return [object() for _ in images]


def test_batches_run_with_one_blas_thread(photo_dir: Path) -> None:
    """OpenBLAS's idle threads spin after each small matrix product and take the cores from
    ONNX Runtime, so the batches are prepared and cropped with one BLAS thread; the setting is
    given back after the last batch."""
    before = _blas_threads()
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))[:5]
    recorder, during = _Recorder(), []
    for photos, errors, prepared in prepared_batches(recorder, paths, 10**8):  # type: ignore[arg-type]
        assert not errors and len(photos) == len(prepared)
        during.append(_blas_threads())  # where the model runs on the batch
    assert recorder.threads == [1, 1, 1] and during == [1, 1, 1]
    assert _blas_threads() == before


class _Counter:
    """Stands in for `CropPredictor.prepare`: counts the decoded photos alive at each call."""

    batch_size = 8

    def __init__(self) -> None:
        self.seen: list[weakref.ref] = []
        self.alive: list[int] = []
        self.lock = threading.Lock()

    def prepare(self, images, hashes):
        with self.lock:
            self.seen += [weakref.ref(im) for im in images]
            self.alive.append(sum(ref() is not None for ref in self.seen))
        return [object() for _ in images]


def test_reading_threads_hold_a_few_decoded_photos_not_batches(photo_dir: Path) -> None:
    """Photos are decoded a few at a time and dropped once prepared: batches of 16 photos of
    12 MP held decoded, two at once, took 1.9 GB for 48 photos. Only the bytes stay."""
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    paths = (paths * 6)[:24]
    counter = _Counter()
    batches = list(prepared_batches(counter, paths, 10**8))  # type: ignore[arg-type]
    assert sum(len(photos) for photos, _, _ in batches) == 24
    assert max(counter.alive) <= PREPARE_THREADS * DECODED_AT_ONCE < counter.batch_size
    assert all(ref() is None for ref in counter.seen)
    assert [photo.path for photos, _, _ in batches for photo in photos] == paths
