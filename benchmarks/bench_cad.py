"""CAD runs: what the distributed machinery costs per item, against the same run in one process.

    .venv/bin/python -m benchmarks.bench_cad [--photos 40] [--variants 4] [--big-items 10000]

The photos are the first `--photos` of shared/data/cq100, shrunk to 160 px, on tiny canvases
(96-128 px) with the lite out-painter: each item's own work is a few milliseconds, so what the
stack adds (queues, object store round trips, run accounting) shows.

1. in-process: `procrop cad`'s loop (`run_embedded`) into a temporary folder: ms per item.
2. stack, 1 outpaint worker: `procrop stack up` in a fresh PROCROP_HOME, the photos uploaded, one
   run POSTed and followed to the end: wall ms per item; overhead_ms = stack - in-process.
3. stack, 2 outpaint workers: a second `procrop worker outpaint` beside the stack's: items/s.
4. a `--big-items` run (the photos x as many variants as it takes): Redis used_memory sampled
   every 0.2 s, its peak over the idle baseline, and the longest queue seen (back-pressure keeps
   it near PROCROP_CAD__MAX_IN_FLIGHT, whatever the run's size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from benchmarks.common import emit

CQ100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cq100"
API_KEY = "bench-cad-key-0123456789abcdef"
CAD_ENV = {
    "PROCROP_CAD__CANVAS_MIN": "96",
    "PROCROP_CAD__CANVAS_MAX": "128",
    "PROCROP_CAD__MIN_PHOTO_SIDE": "32",
    "PROCROP_CAD__MAX_VARIANTS": "1000",
    "PROCROP_CAD__MAX_IN_FLIGHT": "32",
}


def small_photos(count: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted(CQ100.glob("*.jpg"))[:count]:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((160, 160))
            target = folder / path.name
            image.save(target, quality=90)
        out.append(target)
    return out


def in_process(folder: Path, variants: int) -> dict[str, Any]:
    from services.outpainter.pipeline import build_pipeline
    from services.outpainter.run import RunParams, run_embedded
    from shared.settings import load_settings
    from shared.storage import LocalObjectStore

    settings = load_settings()
    pipeline = build_pipeline(settings)
    with tempfile.TemporaryDirectory() as out:
        params = RunParams(str(folder), variants=1, seed=99, limit=1)
        run_embedded(params, pipeline, LocalObjectStore(Path(out) / "warm"), settings)  # warm-up
        start = time.perf_counter()
        report = run_embedded(
            RunParams(str(folder), variants=variants),
            pipeline,
            LocalObjectStore(Path(out) / "run"),
            settings,
        )
        seconds = time.perf_counter() - start
    items = report["items"]
    return {
        "items": items,
        "ms_per_item": round(1000 * seconds / items, 2),
        "items_per_s": round(items / seconds, 2),
    }


def stack_up(home: Path, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """`procrop stack up` in `home` with CAD_ENV (and `extra`) over an environment without
    PROCROP_*; `env`: the services' settings, `up_env`: what `stack up` was given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    env.update({"PROCROP_HOME": str(home), "PROCROP_API_KEYS": API_KEY, **CAD_ENV, **(extra or {})})
    done = subprocess.run(
        [sys.executable, "-m", "procrop", "stack", "up"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"stack up failed: {done.stderr[-2000:]}")
    stack: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    state = json.loads((home / "stack" / "stack.json").read_text())
    stack["env"], stack["up_env"] = {**env, **state["env"]}, env
    return stack


def upload(stack: dict[str, Any], photos: list[Path], prefix: str) -> None:
    from shared.settings import load_settings
    from shared.storage import build_object_store

    env = {k: v for k, v in stack["env"].items() if k.startswith("PROCROP_STORAGE")}
    store = build_object_store(load_settings(**_settings_overrides(env)))
    for path in photos:
        store.put(f"{prefix}{path.name}", path.read_bytes())


def _settings_overrides(env: dict[str, str]) -> dict[str, Any]:
    storage = {k.removeprefix("PROCROP_STORAGE__").lower(): v for k, v in env.items()}
    return {"storage": storage}


def run_on_stack(
    stack: dict[str, Any], source: str, variants: int, seed: int, sampler: Any = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=stack["gateway"], headers=headers, timeout=30) as client:
        start = time.perf_counter()
        answer = client.post(
            "/v1/datasets", json={"source": source, "variants": variants, "seed": seed}
        )
        answer.raise_for_status()
        job_id = answer.json()["job_id"]
        while True:
            body = client.get(f"/v1/datasets/{job_id}").json()
            if (
                body["status"] in ("succeeded", "failed", "cancelled")
                and not body["counts"]["in_flight"]
            ):
                break
            time.sleep(0.1)
        seconds = time.perf_counter() - start
    items = body["counts"]["planned"]
    return {
        "status": body["status"], "items": items, "seconds": round(seconds, 2),
        "ms_per_item": round(1000 * seconds / items, 2), "items_per_s": round(items / seconds, 2),
        "accepted": body["counts"]["accepted"], "rejected": body["counts"]["rejected"],
    }  # fmt: skip


class RedisSampler:
    """used_memory and the longest queue every `interval_s`, in a thread."""

    def __init__(self, url: str, interval_s: float = 0.2) -> None:
        import redis

        self.redis, self.interval_s = redis.Redis.from_url(url), interval_s
        self.baseline = int(self.redis.info("memory")["used_memory"])
        self.peak, self.longest_queue = self.baseline, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.redis.info("memory")["used_memory"]))
            lengths = [self.redis.llen(q) for q in ("embed", "outpaint", "index")]
            self.longest_queue = max(self.longest_queue, *lengths)
            time.sleep(self.interval_s)

    def __enter__(self) -> RedisSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def extra_outpaint_worker(stack: dict[str, Any], home: Path) -> subprocess.Popen[bytes]:
    log = open(home / "extra-outpaint.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "procrop", "worker", "outpaint"], env=stack["env"], stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--big-items", type=int, default=10_000)
    args = parser.parse_args()
    os.environ.update(CAD_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        photos = small_photos(args.photos, Path(tmp) / "photos")
        embedded = in_process(Path(tmp) / "photos", args.variants)
        home = Path(tmp) / "home"
        stack = stack_up(home)
        extra = None
        try:
            upload(stack, photos, "bench/")
            run_on_stack(stack, "bench/", 1, 98)  # warm-up: workers load their pipelines
            one = run_on_stack(stack, "bench/", args.variants, 1)
            extra = extra_outpaint_worker(stack, home)
            time.sleep(5)
            two = run_on_stack(stack, "bench/", args.variants, 2)
            variants = max(1, math.ceil(args.big_items / len(photos)))
            with RedisSampler(stack["redis"]) as sampler:
                big = run_on_stack(stack, "bench/", variants, 3)
            memory = {
                "items": big["items"], "seconds": big["seconds"], "items_per_s": big["items_per_s"],
                "redis_baseline_mb": round(sampler.baseline / 2**20, 2),
                "redis_peak_mb": round(sampler.peak / 2**20, 2),
                "redis_peak_over_baseline_mb": round((sampler.peak - sampler.baseline) / 2**20, 2),
                "bytes_per_item": round((sampler.peak - sampler.baseline) / big["items"]),
                "longest_queue": sampler.longest_queue,
                "max_in_flight": int(CAD_ENV["PROCROP_CAD__MAX_IN_FLIGHT"]),
            }  # fmt: skip
        finally:
            if extra is not None:
                extra.kill()
            subprocess.run(
                [sys.executable, "-m", "procrop", "stack", "down"],
                env=stack["env"],
                capture_output=True,
            )
    emit(
        "cad_runs",
        {
            "photos": len(photos), "variants": args.variants, "canvas": "96-128 px, lite out-painter",
            "in_process": embedded, "stack_1_outpaint_worker": one, "stack_2_outpaint_workers": two,
            "overhead_ms_per_item": round(one["ms_per_item"] - embedded["ms_per_item"], 2),
            "speedup_2_over_1_workers": round(two["items_per_s"] / one["items_per_s"], 2),
            "big_run": memory,
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
