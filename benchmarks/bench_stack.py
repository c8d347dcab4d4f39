"""The distributed stack against the embedded, in-process crop, in one run, on the same photos:
the first N of the FCDB validation split (the trainer's fixed split, seed 2026).

    .venv/bin/python -m benchmarks.bench_stack [--photos 50] [--clients 8] [--submitters 50]
                                               [--pool prefork|solo]

1. embedded: `build_predictor` + `predictor.crop` in this process, one photo at a time (read,
   decode, crop), after one warm-up photo: the per-photo latency a single CLI process gets.
2. stack, sequential: `procrop stack up` in a fresh PROCROP_HOME; each photo POSTed to
   /v1/crops with `wait` (answer when done), one at a time: client-side latency per job, and the
   per-stage times the workers recorded. added_ms_p50 = stack p50 - embedded p50.
3. stack, throughput: the same photos from `--clients` concurrent clients, jobs/s, against the
   embedded loop's photos/s (one process, sequential).
4. gateway submit latency: `--submitters` concurrent clients each POST `--submits` jobs without
   waiting (202); p50 / p99 of the answer time. Workers keep processing meanwhile.
The stack is stopped at the end (`procrop stack down`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bench_crop_speed import validation_photos
from benchmarks.common import FCDB, emit, summary

API_KEY = "bench-key-0123456789abcdef"


def embedded(paths: list[str]) -> dict[str, Any]:
    from services.cropper.postprocess import CropRequest
    from services.cropper.predictor import build_predictor
    from shared.images import content_hash, decode_image
    from shared.settings import load_settings

    predictor = build_predictor(load_settings())

    def one(path: str) -> None:
        data = Path(path).read_bytes()
        predictor.crop([decode_image(data, path)], [content_hash(data)], CropRequest(5))

    one(paths[0])  # warm-up
    ms = []
    for path in paths:
        start = time.perf_counter()
        one(path)
        ms.append((time.perf_counter() - start) * 1000)
    times = np.asarray(ms)
    return {**summary(times), "photos_per_s": round(1000 * len(ms) / times.sum(), 2)}


def stack_up(home: Path, pool: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    env.update(PROCROP_HOME=str(home), PROCROP_API_KEYS=API_KEY, PROCROP_QUEUE__POOL=pool)
    out = subprocess.run(
        [sys.executable, "-m", "procrop", "stack", "up"], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"stack up failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def post(client: httpx.Client, path: str, wait: float) -> tuple[float, dict[str, Any]]:
    data = Path(path).read_bytes()
    start = time.perf_counter()
    response = client.post(
        "/v1/crops", files={"image": (Path(path).name, data, "image/jpeg")},
        data={"n": "5", "wait": str(wait)},
    )  # fmt: skip
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code not in (200, 202):
        sys.exit(f"gateway answered {response.status_code}: {response.text}")
    return elapsed, response.json()


def sequential(gateway: str, redis_url: str, paths: list[str]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=gateway, headers=headers, timeout=120) as client:
        post(client, paths[0], 60)  # warm-up: first features, model pages, connections
        runs = [post(client, path, 60) for path in paths]
    if any(body["status"] != "succeeded" for _, body in runs):
        failed = next(b for _, b in runs if b["status"] != "succeeded")
        sys.exit(f"a job did not succeed: {failed}")
    ms = np.asarray([t for t, _ in runs])
    return {**summary(ms), "breakdown_p50_ms": breakdown(redis_url, [b["job_id"] for _, b in runs])}


def breakdown(redis_url: str, job_ids: list[str]) -> dict[str, float]:
    """Where a job's time goes, from its record: time in each stage and waiting before it (the
    queue hop: Redis, the worker's pool, the job-record update), median over jobs."""
    from shared.jobs import JobStore

    store, rows = JobStore.from_url(redis_url), []
    for job_id in job_ids:
        job = store.get(job_id)
        s, t, previous_end, row = job.started, job.timings, job.created, {}
        for stage in ("embed", "retrieve", "crop"):
            row[f"wait_{stage}"] = s[stage] - previous_end
            row[stage] = t[stage]
            previous_end = s[stage] + t[stage]
        rows.append(row)
    return {k: round(1000 * float(np.median([r[k] for r in rows])), 3) for k in rows[0]}


def throughput(gateway: str, paths: list[str], clients: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def one(path: str) -> str:
        with httpx.Client(base_url=gateway, headers=headers, timeout=300) as client:
            _, body = post(client, path, 120)
            return str(body["status"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, paths))
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "jobs": len(paths),
        "succeeded": statuses.count("succeeded"),
        "seconds": round(seconds, 3),
        "jobs_per_s": round(len(paths) / seconds, 2),
    }


def submit_latency(gateway: str, path: str, submitters: int, submits: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def client_run(_: int) -> list[float]:
        with httpx.Client(base_url=gateway, headers=headers, timeout=120) as client:
            return [post(client, path, 0)[0] for _ in range(submits)]

    with ThreadPoolExecutor(submitters) as pool:
        ms = np.concatenate([np.asarray(r) for r in pool.map(client_run, range(submitters))])
    return {
        "clients": submitters,
        "requests": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--submitters", type=int, default=50)
    parser.add_argument("--submits", type=int, default=4, help="submits per submitter")
    parser.add_argument("--fcdb", type=Path, default=FCDB)
    parser.add_argument("--pool", choices=["prefork", "solo"], default="prefork")
    args = parser.parse_args()
    paths = validation_photos(args.fcdb, args.photos)
    with tempfile.TemporaryDirectory(prefix="procrop-bench-") as home:
        os.environ.pop("PROCROP_HOME", None)
        base = embedded(paths)
        try:
            stack = stack_up(Path(home), args.pool)
            seq = sequential(stack["gateway"], stack["redis"], paths)
            thr = throughput(stack["gateway"], paths, args.clients)
            sub = submit_latency(stack["gateway"], paths[0], args.submitters, args.submits)
        finally:
            subprocess.run(
                [sys.executable, "-m", "procrop", "stack", "down"],
                env={**os.environ, "PROCROP_HOME": home}, capture_output=True,
            )  # fmt: skip
    emit(
        "stack_vs_embedded",
        {
            "photos": len(paths),
            "pool": args.pool,
            "embedded": base,
            "stack_sequential": seq,
            "added_ms_p50": round(seq["p50_ms"] - base["p50_ms"], 3),
            "added_ms_p95": round(seq["p95_ms"] - base["p95_ms"], 3),
            "stack_throughput": thr,
            "throughput_ratio_stack_over_embedded": round(
                thr["jobs_per_s"] / base["photos_per_s"], 3
            ),
            "gateway_submit": sub,
        },
    )


if __name__ == "__main__":
    main()
