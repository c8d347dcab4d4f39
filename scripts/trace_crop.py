"""Trace `procrop crop` on one photo: which project files it enters and how often control passes
from one project file to another (Python-level calls, via `sys.setprofile`).

    .venv/bin/python scripts/trace_crop.py PHOTO [procrop crop options] [--path]

Prints JSON: {"files": N, "transitions": M, "by_file": {...}} (`--path`: every transition too). A transition is a call or return
whose frame is in another project file than the previous project frame; module bodies run at
import time are left out, so the figures describe the crop path, not the import graph.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(str(ROOT / p) for p in ("procrop", "services", "shared"))


def main(argv: list[str]) -> None:
    verbose = "--path" in argv
    argv = [a for a in argv if a != "--path"]
    from procrop.cli import cli

    entered: Counter[str] = Counter()
    transitions = 0
    last: str | None = None
    path_taken: list[str] = []

    def profile(frame, event, arg):
        nonlocal transitions, last
        if event not in ("call", "return"):
            return
        path = frame.f_code.co_filename
        # Module and class bodies (code without CO_OPTIMIZED) run at import time: left out.
        if not path.startswith(PACKAGES) or not frame.f_code.co_flags & inspect.CO_OPTIMIZED:
            return
        rel = str(Path(path).relative_to(ROOT))
        if event == "call":
            entered[rel] += 1
        if last is not None and rel != last:
            transitions += 1
            path_taken.append(f"{last} -> {rel} ({frame.f_code.co_name})")
        last = rel

    sys.setprofile(profile)
    try:
        cli(["crop", *argv], standalone_mode=False)
    finally:
        sys.setprofile(None)
    print(json.dumps({"files": len(entered), "transitions": transitions,
                      "by_file": dict(entered.most_common()),
                      **({"path": path_taken} if verbose else {})}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
