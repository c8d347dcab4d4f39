"""CAD runs against Redis being SIGKILLed while they run: how many runs stall, and whether any item
is lost or counted twice. The fault of `tests/e2e/test_cad_stack.py`, repeated many times.

    .venv/bin/python -m benchmarks.faults_cad_redis [--runs 10] [--kills 2] [--photos 12]

`procrop stack up` in a fresh PROCROP_HOME (the lite out-painter on small canvases, as in
`bench_cad`), with the gateway's recovery after `--recover-after` s (`PROCROP_QUEUE__RECOVER_AFTER_S`).
Each run is `--photos` cq100 photos x 2 variants. During a run, `--kills` times: wait until an item
finishes (the moment its planner is woken, so some kills land in a planner pass), SIGKILL Redis,
bring it back with `stack up` (same port, same append-only file). A run that makes no progress for
`--stall` s is counted as stalled and left. For each run: finished, whether the manifest has every
(photo, variant) exactly once, the counters equal to the manifest's finished lines, the seconds it took, and the
longest wait between two finished items. To compare with the code before a change, run the same
command with PYTHONPATH pointing at that checkout (the stack's processes inherit it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_cad import API_KEY, small_photos, stack_up, upload
from benchmarks.common import emit
from procrop.remote import dataset_status

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _restart_redis(home: Path, env: dict[str, str]) -> float:
    """SIGKILL the stack's Redis and bring it back with `stack up`; seconds it was away."""
    state = json.loads((home / "stack" / "stack.json").read_text())
    start = time.perf_counter()
    os.kill(state["processes"]["redis"]["pid"], signal.SIGKILL)
    time.sleep(0.5)
    done = subprocess.run(
        [sys.executable, "-m", "procrop", "stack", "up"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"stack up failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def one_run(
    client: httpx.Client, home: Path, env: dict[str, str], photos: list[str], seed: int,
    kills: int, stall_s: float, rng: random.Random,
) -> dict[str, Any]:  # fmt: skip
    job_id = client.post(
        "/v1/datasets", json={"source": "faults/", "variants": 2, "seed": seed}
    ).json()["job_id"]
    total = 2 * len(photos)
    kill_at = sorted(rng.sample(range(2, total - 2), kills))
    start = last_change = time.perf_counter()
    finished, longest_wait, outage_s = -1, 0.0, 0.0
    while True:
        body = dataset_status(client, job_id)
        now = time.perf_counter()
        done = body["counts"]["finished"]
        if done != finished:
            longest_wait = max(longest_wait, now - last_change)
            finished, last_change = done, now
        if body["status"] in ("succeeded", "failed") and body["counts"]["in_flight"] == 0:
            break
        if now - last_change > stall_s:
            break
        if kill_at and done >= kill_at[0]:
            kill_at.pop(0)
            outage_s += _restart_redis(home, env)
            last_change = time.perf_counter()  # the restart's own time is not a stall
            continue
        time.sleep(0.05)
    lines = [
        json.loads(line) for line in client.get(f"/v1/datasets/{job_id}/manifest").text.splitlines()
    ]
    per_item = Counter((line["photo"], line["variant"]) for line in lines)
    statuses = Counter(line["status"] for line in lines)
    return {
        "status": body["status"],
        "stalled": body["status"] != "succeeded",
        "finished": body["counts"]["finished"],
        "items": total,
        "every_item_once": per_item == {(p, v): 1 for p in photos for v in range(2)},
        "counters_match": all(
            body["counts"].get(s) == n for s, n in statuses.items() if s != "queued"
        ),
        "seconds": round(time.perf_counter() - start - outage_s, 1),
        "longest_wait_s": round(longest_wait, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="Redis SIGKILLs per run")
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--stall", type=float, default=150.0, help="s without progress")
    parser.add_argument("--recover-after", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        stack = stack_up(
            home,
            {
                "PROCROP_QUEUE__RECOVER_AFTER_S": str(args.recover_after),
                "PROCROP_QUEUE__RECOVER_EVERY_S": "5",
                "PROCROP_CAD__MAX_IN_FLIGHT": "8",
            },
        )
        env = stack["up_env"]
        try:
            photos = small_photos(args.photos, Path(tmp) / "photos")
            upload(stack, photos, "faults/")
            with httpx.Client(base_url=stack["gateway"], headers=HEADERS, timeout=30) as client:
                runs = [
                    one_run(client, home, env, [p.name for p in photos], seed, args.kills,
                            args.stall, rng)
                    for seed in range(args.runs)
                ]  # fmt: skip
        finally:
            subprocess.run(
                [sys.executable, "-m", "procrop", "stack", "down"], env=env, capture_output=True
            )
    emit(
        "faults_cad_redis",
        {
            "params": vars(args),
            "code": os.environ.get("PYTHONPATH", "this checkout"),
            "runs": len(runs),
            "redis_kills": args.runs * args.kills,
            "stalled_runs": sum(r["stalled"] for r in runs),
            "finished_runs_with_an_item_lost_or_twice": sum(
                not r["stalled"] and not r["every_item_once"] for r in runs
            ),
            "runs_with_counters_off": sum(not r["counters_match"] for r in runs),
            "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2],
            "longest_wait_s": max(r["longest_wait_s"] for r in runs),
            "per_run": runs,
        },
    )


if __name__ == "__main__":
    main()
