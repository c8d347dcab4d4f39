"""Local servers on loopback for the local stack and the tests: an S3 server (SeaweedFS) and
Milvus Lite in server mode. Each runs as a child process on free ports, with state in a folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ProCropError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A free port P whose gRPC companion P + 10000 is free too (SeaweedFS's convention)."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise ProCropError("no free port pair on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ProCropError(f"server exited with status {proc.returncode} before port {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise ProCropError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s")


@dataclass
class ServerProcess:
    """A started server: its process, its address, and how to stop it."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    kill_signal: int = signal.SIGTERM
    info: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.kill_signal)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _which(tool: str) -> str:
    local = Path(sys.executable).parent / tool  # the venv's own copy first
    found = str(local) if local.exists() else shutil.which(tool)
    if not found:
        raise ProCropError(f"{tool} not found: run `make setup`")
    return found


def start_seaweedfs(
    data_dir: Path, access_key: str, secret_key: str, timeout_s: float = 60.0
) -> ServerProcess:
    """SeaweedFS (master, volume, filer, S3 gateway) on loopback; S3 at 127.0.0.1:port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    identity = {
        "name": "procrop",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = {name: free_port_pair() for name in ("master", "volume", "filer", "s3")}
    cmd = [
        _which("weed"), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={data_dir}", f"-s3.config={config}", "-volume.max=0",
        "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
    ]  # fmt: skip
    server = _spawn("seaweedfs", cmd, ports["s3"], data_dir / "weed.log", signal.SIGKILL)
    _wait_s3_ready(server, timeout_s)
    return server


def _wait_s3_ready(server: ServerProcess, timeout_s: float) -> None:
    """The S3 port opens before the filer behind it is ready: poll until a listing answers."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    wait_for_port(server.port, timeout_s, server.proc)
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=2)
            return
        except urllib.error.HTTPError as exc:  # 403 without credentials: S3 is answering
            if exc.code in (400, 403):
                return
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise ProCropError(f"S3 server not ready after {timeout_s:.0f} s; see {server.log_path}")


def start_milvus_lite(data_dir: Path, timeout_s: float = 60.0) -> ServerProcess:
    """Milvus Lite in server mode (gRPC) on loopback, for several processes sharing one index."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        _which("milvus-lite"), "server", "--data-dir", str(data_dir),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    server = _spawn("milvus-lite", cmd, port, data_dir / "milvus.log", signal.SIGTERM)
    wait_for_port(port, timeout_s, server.proc)
    return server


def _spawn(name: str, cmd: list[str], port: int, log_path: Path, sig: int) -> ServerProcess:
    log.info("starting %s: %s", name, " ".join(cmd))
    handle = log_path.open("ab")
    proc = subprocess.Popen(
        cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=log_path.parent, start_new_session=True, env={**os.environ},
    )  # fmt: skip
    return ServerProcess(name, proc, port, log_path, sig)


def start_redis(data_dir: Path, timeout_s: float = 30.0) -> ServerProcess:
    """redis-server on loopback, no persistence (job records and queues of a local stack)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise ProCropError(
            "redis-server not found: run `make setup` (apt-get install redis-server)"
        )
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(data_dir),
    ]  # fmt: skip
    server = _spawn("redis", cmd, port, data_dir / "redis.log", signal.SIGTERM)
    wait_for_port(port, timeout_s, server.proc)
    return server
