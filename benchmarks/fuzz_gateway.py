"""Fuzz the gateway longer than CI does: schemathesis over its OpenAPI document against a real
gateway process on real Redis, S3 and Milvus Lite (the test module
`tests/services/gateway/test_openapi_fuzz.py`, with more examples per operation). Prints JSON:
cases, operations, status counts, failed operations, seconds.

    .venv/bin/python -m benchmarks.fuzz_gateway --examples 500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST = "tests/services/gateway/test_openapi_fuzz.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="Cases per operation, at most.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "PROCROP_FUZZ_EXAMPLES": str(args.examples),
               "PROCROP_FUZZ_REPORT": str(report)}  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider", "-rf"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        result = json.loads(report.read_text()) if report.exists() else {}
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    print(json.dumps({"examples_per_operation": args.examples, **result, "failed": failed,
                      "seconds": round(seconds, 1), "exit_status": done.returncode}))  # fmt: skip
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
