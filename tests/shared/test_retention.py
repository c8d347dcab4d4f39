"""Retention (shared/retention.py) on a real S3 server and Redis: job outputs and uploads go once
their records expired, after a grace period; everything still referenced stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from shared.jobs import JobStore
from shared.ownership import UploadOwners
from shared.retention import MARKS, sweep
from shared.settings import Settings
from shared.storage import build_object_store

SHA_KEPT, SHA_GONE = "a" * 64, "b" * 64


def test_sweep_deletes_only_what_expired_records_referred_to(
    s3_settings: Settings, redis_url: str
) -> None:
    store = build_object_store(s3_settings)
    client = redis.Redis.from_url(redis_url)
    jobs = JobStore.from_url(redis_url, ttl_s=3600)
    live = jobs.create("crop", "owner-1", {})
    gone = "0" * 32  # its record expired
    for job_id in (live.id, gone):
        store.put(f"jobs/{job_id}/result.json", b"{}")
        store.put(f"jobs/{job_id}/neighbors.safetensors", b"x")
    store.put(f"uploads/{SHA_KEPT}.jpg", b"photo")
    store.put(f"uploads/{SHA_GONE}.png", b"photo")
    UploadOwners(client, 3600).record("owner-1", SHA_KEPT)
    store.put("collections/pro/tokens/0.safetensors", b"t")  # not ours to expire

    first = sweep(store, client, grace_s=60, now=1000.0)
    assert (first.deleted, first.marked) == (0, 3)  # marked, not deleted yet
    assert sweep(store, client, grace_s=60, now=1030.0).deleted == 0  # within the grace period
    second = sweep(store, client, grace_s=60, now=1061.0)
    assert (second.deleted, second.marked) == (3, 0)
    assert sorted(store.list("")) == sorted([
        f"jobs/{live.id}/neighbors.safetensors", f"jobs/{live.id}/result.json",
        f"uploads/{SHA_KEPT}.jpg", "collections/pro/tokens/0.safetensors",
    ])  # fmt: skip
    assert client.hlen(MARKS) == 0


def test_an_object_referenced_again_loses_its_mark(s3_settings: Settings, redis_url: str) -> None:
    store = build_object_store(s3_settings)
    client = redis.Redis.from_url(redis_url)
    store.put(f"uploads/{SHA_GONE}.png", b"photo")
    sweep(store, client, grace_s=60, now=1000.0)  # marked
    UploadOwners(client, 3600).record("owner-2", SHA_GONE)  # uploaded again
    assert sweep(store, client, grace_s=60, now=2000.0).deleted == 0
    assert client.hlen(MARKS) == 0 and store.exists(f"uploads/{SHA_GONE}.png")


def test_procrop_sweep_prints_what_it_did(
    s3_settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from procrop.cli import cli

    store = build_object_store(s3_settings)
    store.put("jobs/" + "1" * 32 + "/result.json", b"{}")
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", redis_url)
    runner = CliRunner()
    first = runner.invoke(cli, ["sweep", "--grace", "0"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.output) == {"deleted": 0, "marked": 1}
    second = runner.invoke(cli, ["sweep", "--grace", "0"])
    assert json.loads(second.output) == {"deleted": 1, "marked": 0}
    assert list(store.list("jobs/")) == []


def test_procrop_sweep_check_says_whether_it_could_sweep(
    s3_settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from procrop.cli import cli
    from procrop.servers import free_port

    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", redis_url)
    build_object_store(s3_settings).put("jobs/" + "2" * 32 + "/result.json", b"{}")
    ok = CliRunner().invoke(cli, ["sweep", "--check"])
    assert (ok.exit_code, ok.output) == (0, "")
    assert redis.Redis.from_url(redis_url).hlen(MARKS) == 0  # it swept nothing
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    down = CliRunner().invoke(cli, ["sweep", "--check"])
    assert down.exit_code == 1
    assert down.output.startswith("procrop: error: Redis: ") and len(down.output.splitlines()) == 1


def test_procrop_sweep_every_keeps_sweeping_when_a_pass_fails(
    s3_settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The compose sweeper (`procrop sweep --every 3600`): a first pass with Redis away is
    logged and the process stays up for the next one; with Redis up, a pass prints its report."""
    from procrop.servers import free_port

    def start(url: str) -> tuple[subprocess.Popen[str], Path]:
        err = tmp_path / f"sweep-{len(list(tmp_path.iterdir()))}.err"
        env = {**os.environ, "PROCROP_QUEUE__REDIS_URL": url}
        cmd = [sys.executable, "-m", "procrop", "sweep", "--grace", "0", "--every", "3600"]
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True
        ), err

    down, down_err = start(f"redis://127.0.0.1:{free_port()}/0")
    up, _ = start(redis_url)
    try:
        assert up.stdout is not None
        assert json.loads(up.stdout.readline()) == {"deleted": 0, "marked": 0}
        deadline = time.monotonic() + 60
        while "sweep failed, next in 3600 s" not in down_err.read_text():
            assert down.poll() is None, down_err.read_text()
            assert time.monotonic() < deadline, down_err.read_text()
            time.sleep(0.2)
        time.sleep(1)
        assert down.poll() is None and up.poll() is None  # both wait for their next pass
    finally:
        for proc in (down, up):
            proc.kill()
            proc.wait()
