"""A gateway client for `procrop cad --gateway URL`: submit a dataset run, follow it, fetch its
manifest. The API key comes from PROCROP_API_KEY (or the first of PROCROP_API_KEYS)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from shared.errors import ProCropError, shorten

POLL_S = 1.0
PATIENCE_S = 120.0  # how long a status poll rides out a gateway that is away or answers 5xx


def _api_key() -> str:
    key = os.environ.get("PROCROP_API_KEY") or os.environ.get("PROCROP_API_KEYS", "").split(",")[0]
    if not key.strip():
        raise ProCropError("set PROCROP_API_KEY to an API key of the gateway")
    return key.strip()


def _check(answer: httpx.Response) -> Any:
    if answer.status_code >= 400:
        try:
            detail = answer.json().get("detail", answer.text)
        except ValueError:
            detail = answer.text
        raise ProCropError(f"gateway answered {answer.status_code}: {shorten(str(detail), 300)}")
    return answer.json()


def submit_dataset(url: str, params: Any, run: str | None, out: str | None) -> dict[str, Any]:
    """POST the run, show its progress until it ends, write its manifest to OUT (a folder) and
    return its status (with the report)."""
    body = {k: v for k, v in asdict(params).items() if v is not None}
    if run:
        body["run"] = run
    headers = {"Authorization": f"Bearer {_api_key()}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30) as client:
        try:
            job_id = _check(client.post("/v1/datasets", json=body))["job_id"]
            status = _follow(client, job_id)
            manifest = client.get(f"/v1/datasets/{job_id}/manifest")
        except httpx.HTTPError as exc:
            raise ProCropError(f"{url}: {exc}") from None
        if out:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "manifest.jsonl").write_bytes(manifest.content)
            (folder / "status.json").write_text(json.dumps(status, indent=1))
        return status


def dataset_status(
    client: httpx.Client, job_id: str, patience_s: float = PATIENCE_S
) -> dict[str, Any]:
    """GET /v1/datasets/{job_id}. A gateway that cannot be reached or answers 5xx (restarting,
    or waiting out its Redis) is asked again every POLL_S for up to `patience_s`, then a
    ProCropError says why; a 4xx answer raises at once."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            answer = client.get(f"/v1/datasets/{job_id}")
            if answer.status_code < 500:
                return dict(_check(answer))
            problem = f"gateway answered {answer.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise ProCropError(f"no status of run {job_id} for {patience_s:.0f} s ({problem})")
        time.sleep(POLL_S)


def _follow(client: httpx.Client, job_id: str) -> dict[str, Any]:
    with tqdm(total=0, unit="item", file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            status = dataset_status(client, job_id)
            counts = status["counts"]
            bar.total = counts["planned"]
            bar.n = counts["finished"]
            bar.set_postfix(accepted=counts["accepted"], rejected=counts["rejected"], refresh=False)
            bar.refresh()
            if status["status"] in ("succeeded", "failed", "cancelled") and not counts["in_flight"]:
                return status
            time.sleep(POLL_S)
