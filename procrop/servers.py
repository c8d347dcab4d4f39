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
    """SeaweedFS (master, volume, filer, S3 gateway) on loopback; S3 at 127.0.0.1:port.

    Only S3, with the credentials, reads or writes objects: the filer serves gRPC only (its HTTP
    API would list and serve every bucket to anyone), and the volume server refuses reads and
    writes without a JWT signed by keys in `security.toml` (random, mode 0600), which only the
    SeaweedFS processes read. Left open, on loopback: the master's topology (volume ids and
    counts, no contents) and the gRPC ports (no TLS; see the README)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    identity = {
        "name": "procrop",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config = _write_secret(data_dir / "s3.json", json.dumps({"identities": [identity]}))
    _write_secret(data_dir / "security.toml", _seaweedfs_security())
    ports = {name: free_port_pair() for name in ("master", "volume", "filer", "s3")}
    cmd = [
        _which("weed"), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={data_dir}", f"-s3.config={config}", "-volume.max=0",
        "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", "-filer.disableHttp",
    ]  # fmt: skip
    server = _spawn("seaweedfs", cmd, ports["s3"], data_dir / "weed.log", signal.SIGKILL)
    _wait_s3_ready(server, timeout_s)
    return server


def _write_secret(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable by this user only (created 0600, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)
    return path


def _seaweedfs_security() -> str:
    """security.toml: random keys for the JWTs that volume reads and writes (and filer calls)
    need; SeaweedFS reads it from its working directory."""
    import secrets

    sections = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
    return "".join(
        f'[{name}]\nkey = "{secrets.token_urlsafe(32)}"\nexpires_after_seconds = 10\n\n'
        for name in sections
    )


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


# Redis settings of every deployment (the stack's, compose's, Kubernetes'), kept in one file:
# deploy/redis/redis.conf. The stack writes the same directives (tests/procrop/test_servers.py
# checks they agree); the password and where to listen are added per server.
REDIS_CONF = (
    "appendonly yes",
    "appendfsync everysec",
    "aof-use-rdb-preamble yes",
    "save 3600 1 300 100 60 10000",
    "maxmemory-policy noeviction",
    "protected-mode yes",
)


def start_redis(
    data_dir: Path, password: str | None = None, port: int = 0, timeout_s: float = 30.0
) -> ServerProcess:
    """redis-server on loopback with durable state (append-only file in `data_dir`, fsynced every
    second) and, given `password`, AUTH required. `port` 0 picks a free one; give the old port
    (and the same `data_dir`) to bring a stopped server back with its queues and job records."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise ProCropError(
            "redis-server not found: run `make setup` (apt-get install redis-server)"
        )
    lines = [*REDIS_CONF, "bind 127.0.0.1", f"port {port}", f'dir "{data_dir}"']
    if password:
        lines.append(f'requirepass "{password}"')
    conf = _write_secret(data_dir / "redis.conf", "\n".join(lines) + "\n")  # the password
    server = _spawn("redis", [binary, str(conf)], port, data_dir / "redis.log", signal.SIGTERM)
    wait_for_port(port, timeout_s, server.proc)
    return server


def restart_server(
    name: str, cmd: list[str], port: int, log_path: Path, timeout_s: float = 60.0
) -> ServerProcess:
    """Run a stopped server again exactly as it was started (`cmd` as recorded: same port, same
    data folder, same credentials), and wait until it answers."""
    sig = signal.SIGKILL if name == "s3" else signal.SIGTERM
    server = _spawn(name, cmd, port, log_path, sig)
    if name == "s3":
        _wait_s3_ready(server, timeout_s)
    else:
        wait_for_port(port, timeout_s, server.proc)
    return server
