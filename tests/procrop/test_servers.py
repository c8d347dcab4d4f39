"""The local servers (procrop/servers.py): Redis durable and locked, SeaweedFS serving objects
only through S3 with credentials, secrets files readable by their owner only."""

from __future__ import annotations

import io
import os
import signal
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from minio import Minio

from procrop.servers import REDIS_CONF, ServerProcess, restart_server, start_redis

REPO = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_redis_needs_its_password_and_keeps_its_data_across_a_sigkill(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", password="pw-0123456789abcdef")
    try:
        url = f"redis://:pw-0123456789abcdef@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(url)
        client.set("queued", "job-1")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).get("queued")  # no password: refused
        time.sleep(1.5)  # appendfsync everysec: on disk within a second
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        server = restart_server("redis", list(server.proc.args), server.port, server.log_path)  # type: ignore[arg-type]
        assert redis.Redis.from_url(url).get("queued") == b"job-1"  # same port, same data
    finally:
        server.stop()
    assert _mode(tmp_path / "redis" / "redis.conf") == 0o600  # it holds the password


def test_the_stack_writes_the_redis_conf_that_deployments_mount() -> None:
    """deploy/redis/redis.conf (compose, Kubernetes) and the stack's directives are one list."""
    lines = (REPO / "deploy" / "redis" / "redis.conf").read_text().splitlines()
    directives = [line for line in lines if line.strip() and not line.startswith("#")]
    assert directives == list(REDIS_CONF)
    assert "appendonly yes" in directives and "appendfsync everysec" in directives


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_seaweedfs_serves_objects_only_through_s3_with_credentials(
    s3_server: ServerProcess,
) -> None:
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

    client = Minio(f"127.0.0.1:{s3_server.port}", S3_ACCESS_KEY, S3_SECRET_KEY, secure=False)
    bucket = "locked-filer"
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    client.put_object(bucket, "jobs/j1/result.json", io.BytesIO(b'{"secret": 1}'), 13)
    assert client.get_object(bucket, "jobs/j1/result.json").read() == b'{"secret": 1}'
    args = {a.split("=", 1)[0]: a.split("=", 1)[-1] for a in s3_server.proc.args}  # type: ignore[union-attr]
    filer, volume = args["-filer.port"], args["-volume.port"]
    for path in (f"buckets/{bucket}/jobs/j1/", f"buckets/{bucket}/jobs/j1/result.json"):
        status, body = _get(f"http://127.0.0.1:{filer}/{path}")  # the filer's HTTP API
        assert status >= 400 and b"secret" not in body and b"result.json" not in body
    status, _ = _get(f"http://127.0.0.1:{volume}/1,01")  # a volume read without a JWT
    assert status == 401
    data_dir = Path(args["-dir"])
    assert _mode(data_dir / "s3.json") == 0o600 and _mode(data_dir / "security.toml") == 0o600
