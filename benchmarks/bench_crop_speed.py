"""End-to-end speed and memory of `procrop crop` against smartcrop.py (0.5.0), one run, the same
photos: the first N of the FCDB validation split (the trainer's fixed split, seed 2026).

    .venv/bin/python -m benchmarks.bench_crop_speed [--photos 100] [--small 10] [--fcdb PATH]

Every timed run is ONE child process over all its photos, wall time from spawn to exit (interpreter
start-up, imports, model and index loading included):

- procrop: `.venv/bin/procrop crop --json PHOTO...` (default profile, shipped model, 5 crops per
  photo) with a fresh temporary PROCROP_HOME and every other PROCROP_* variable removed. "cold" is
  the first run in that home (with a cold OS page cache for the model files only if the system
  dropped them); "warm" is the same command again in the same home.
- smartcrop: `benchmarks/smartcrop_runner.py PHOTO...`: the README's documented call,
  `SmartCrop().crop(image, 100, 100)`, for every photo: a 1:1 crop as large as the photo allows
  (smartcrop tries 1.0x and 0.9x the shorter side), analysed on a copy prescaled to ~111 px.
  Photos decoded as procrop decodes them (EXIF orientation, RGB). One crop per photo.

ms_per_photo_after_startup = (t_N - t_small) / (N - small): the same warm command on the first
`small` photos and on all N, so start-up cancels out. The photo files are read once before any
timing so that every run finds them in the page cache.

Memory: each child is reaped with os.wait4, whose rusage is that child's own (not the max over
every child this process ever had, as RUSAGE_CHILDREN would be): peak_rss_mb is its ru_maxrss, the
largest resident set of the child or any process it waited for. peak_tree_rss_mb is the largest SUM
of resident sets over the child and its live descendants, sampled from /proc every 50 ms (null
where /proc is missing), which also counts helper processes such as a Milvus Lite server.
Exits with status 1 and the tail of procrop's stderr if procrop fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import FCDB, emit
from shared.annotations import fixed_split, load_fcdb

RUNNER = Path(__file__).resolve().with_name("smartcrop_runner.py")
SAMPLE_S = 0.05
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def validation_photos(fcdb: Path, n: int) -> list[str]:
    names = fixed_split(sorted(load_fcdb(fcdb / "annotations.json")))[1][:n]
    paths = [str((fcdb / name).resolve()) for name in names]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        sys.exit(f"bench_crop_speed: {len(missing)} photos missing, e.g. {missing[0]}")
    return paths


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


def _tree_rss(root: int) -> int | None:
    """Resident bytes of `root` and all its descendants, or None without /proc."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            if pid == root:
                return None
            continue
        todo.extend(_children(pid))
    return total


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` to completion: wall time, exit status, output, and its peak memory."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        tree_peak: int | None = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _tree_rss(proc.pid)
            if rss is not None:
                tree_peak = max(tree_peak or 0, rss)
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    maxrss_kb = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS
    return {
        "wall_s": round(wall, 3),
        "returncode": proc.returncode,
        "peak_rss_mb": round(maxrss_kb / 1024, 1),
        "peak_tree_rss_mb": round(tree_peak / 2**20, 1) if tree_peak is not None else None,
        "stdout": stdout,
        "stderr": stderr,
    }


def check(tool: str, run: dict[str, Any], photos: int) -> None:
    """Exit with a clear message unless the run succeeded with one JSON line per photo."""
    lines = [ln for ln in run["stdout"].splitlines() if ln.startswith("{")]
    if run["returncode"] == 0 and len(lines) == photos:
        return
    tail = "\n".join(run["stderr"].strip().splitlines()[-20:])[-3000:]
    problem = (
        f"exited with status {run['returncode']}"
        if run["returncode"]
        else f"printed {len(lines)} JSON lines for {photos} photos"
    )
    sys.exit(f"bench_crop_speed: {tool} {problem}; its stderr ends:\n{tail or '(empty)'}")


def summary(run: dict[str, Any], label: str, photos: int) -> dict[str, Any]:
    keys = ("wall_s", "peak_rss_mb", "peak_tree_rss_mb")
    return {"run": label, "photos": photos, **{k: run[k] for k in keys}}


def per_photo_ms(t_all: float, t_small: float, n_all: int, n_small: int) -> float | None:
    return round((t_all - t_small) / (n_all - n_small) * 1000, 2) if n_all > n_small else None


def procrop_exe() -> str:
    exe = Path(sys.executable).parent / "procrop"
    if not exe.is_file():
        sys.exit(f"bench_crop_speed: {exe} not found; run `make setup` (pip install -e .)")
    return str(exe)


def bench_procrop(paths: list[str], small: int) -> dict[str, Any]:
    exe = procrop_exe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    with tempfile.TemporaryDirectory(prefix="procrop-bench-home-") as home:
        env["PROCROP_HOME"] = home
        runs = []
        for label, subset in (("cold", paths), ("warm", paths), ("warm_small", paths[:small])):
            run = measure([exe, "crop", "--json", *subset], env)
            check(f"procrop ({label} run, {len(subset)} photos)", run, len(subset))
            runs.append(summary(run, label, len(subset)))
    cold, warm, warm_small = runs
    return {
        "cold_wall_s": cold["wall_s"],
        "warm_wall_s": warm["wall_s"],
        "ms_per_photo_after_startup": per_photo_ms(
            warm["wall_s"], warm_small["wall_s"], len(paths), small
        ),
        **_peaks(runs),
    }


def bench_smartcrop(paths: list[str], small: int) -> dict[str, Any]:
    runs = []
    for label, subset in (("all", paths), ("small", paths[:small])):
        run = measure([sys.executable, str(RUNNER), *subset])
        check(f"smartcrop ({len(subset)} photos)", run, len(subset))
        runs.append(summary(run, label, len(subset)))
    full, part = runs
    return {
        "wall_s": full["wall_s"],
        "ms_per_photo_after_startup": per_photo_ms(
            full["wall_s"], part["wall_s"], len(paths), small
        ),
        **_peaks(runs),
    }


def _peaks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The peak memory over `runs`, and the runs themselves."""
    return {
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_tree_rss_mb": _max_or_none(r["peak_tree_rss_mb"] for r in runs),
        "runs": runs,
    }


def _max_or_none(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=100, help="first N of the val split (≤200)")
    parser.add_argument("--small", type=int, default=10, help="photos in the start-up run")
    parser.add_argument("--fcdb", type=Path, default=FCDB, help="folder with annotations.json")
    parser.add_argument(
        "--only", choices=["procrop", "smartcrop"], help="run one side (no ratio is reported)"
    )
    args = parser.parse_args()
    paths = validation_photos(args.fcdb, args.photos)
    small = max(1, min(args.small, len(paths) // 2))
    for path in paths:  # page cache: no run pays for the first disk read
        Path(path).read_bytes()
    try:
        import smartcrop  # noqa: F401
    except ImportError:
        if args.only != "procrop":
            sys.exit("bench_crop_speed: smartcrop missing: .venv/bin/pip install smartcrop==0.5.0")
    result: dict[str, Any] = {"photos": len(paths), "small_run_photos": small}
    if args.only != "smartcrop":
        result["procrop"] = bench_procrop(paths, small)
    if args.only != "procrop":
        result["smartcrop"] = bench_smartcrop(paths, small)
    if "procrop" in result and "smartcrop" in result:
        base = result["smartcrop"]["wall_s"]
        result["ratio_wall_procrop_over_smartcrop"] = {
            "warm": round(result["procrop"]["warm_wall_s"] / base, 2),
            "cold": round(result["procrop"]["cold_wall_s"] / base, 2),
        }
    emit("crop_speed_vs_smartcrop", result)


if __name__ == "__main__":
    main()
