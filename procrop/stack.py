"""The local stack: every ProCrop service on loopback, as separate processes, for tests and trials.

    procrop stack up        # start what is not running; last stdout line: JSON with the gateway
    procrop stack status    # JSON: each process, alive or not, and the endpoints
    procrop stack down      # stop every process the stack started (by pid), and nothing else

Processes: redis-server, SeaweedFS (S3), Milvus Lite in server mode, one Celery worker per queue
(embed, retrieve, crop, index, outpaint) and the gateway. State lives in `$PROCROP_HOME/stack/`:
`stack.json` (pids with their start times, ports, the environment the services got; mode 0600:
it holds the API key and S3 secret), each server's data, and one log per process.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procrop.servers import (
    ServerProcess,
    free_port,
    restart_server,
    start_milvus_lite,
    start_redis,
    start_seaweedfs,
)
from shared.errors import ProCropError
from shared.settings import Settings

log = logging.getLogger(__name__)
WORKER_QUEUES = ("embed", "retrieve", "crop", "index", "outpaint")
PRELOADING = ("embed", "retrieve", "crop")  # workers that load models (or an index) at start
INFRA = ("redis", "s3", "milvus")
STATE_FILE = "stack.json"
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StackProcess:
    name: str
    pid: int
    start_time: int  # /proc/PID/stat field 22: tells our process from a later one with its pid
    log: str
    cmd: list[str]

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces: cut after it
    return int(fields[19]) if fields[0] not in ("Z", "X") else None


class Stack:
    """The stack whose state is under `home/stack`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.home / "stack"
        self.state_path = self.dir / STATE_FILE

    # --- state ------------------------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def _save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.state_path)

    @staticmethod
    def processes(state: dict[str, Any]) -> dict[str, StackProcess]:
        return {n: StackProcess(name=n, **p) for n, p in state["processes"].items()}

    # --- up / down / status -----------------------------------------------------------------

    def up(self) -> dict[str, Any]:
        """Start the stack, or what of it is not running; returns its summary once all is ready."""
        state = self.load()
        if state is not None:
            self._restart_dead_infra(state)
        else:
            state = self._start_infra()
        commands = self._service_commands(state)
        spawned = set()
        for name, cmd in commands.items():
            proc = state["processes"].get(name)
            if proc is None or not StackProcess(name=name, **proc).alive():
                state["processes"][name] = self._spawn(name, cmd, state["env"])
                spawned.add(name)
                self._save(state)
        self._wait_ready(state, commands, spawned)
        return self.summary(state)

    def _start_infra(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        access, secret = "procrop", secrets.token_urlsafe(24)
        redis_password = secrets.token_urlsafe(24)  # URL-safe: it goes into the Redis URL
        with ThreadPoolExecutor(3) as pool:
            futures = {
                "redis": pool.submit(start_redis, self.dir / "redis", redis_password),
                "s3": pool.submit(start_seaweedfs, self.dir / "s3", access, secret),
                "milvus": pool.submit(start_milvus_lite, self.dir / "milvus"),
            }
        failed = [f.exception() for f in futures.values() if f.exception() is not None]
        if failed:  # stop the servers that did start: nothing is left without a state file
            for future in futures.values():
                if future.exception() is None:
                    future.result().stop()
            raise ProCropError(f"could not start the stack's servers: {failed[0]}")
        servers = {name: future.result() for name, future in futures.items()}
        env = self._service_env(servers, access, secret, redis_password)
        state = {
            "processes": {n: _record(s) for n, s in servers.items()},
            "env": env,
            "endpoints": {
                "gateway": f"http://127.0.0.1:{env['PROCROP_GATEWAY__PORT']}",
                "redis": env["PROCROP_QUEUE__REDIS_URL"],
                "s3": env["PROCROP_STORAGE__ENDPOINT"],
                "milvus": env["PROCROP_MILVUS__URI"],
            },
        }
        self._save(state)
        return state

    def _restart_dead_infra(self, state: dict[str, Any]) -> None:
        """Start each dead server again on its own port, data and credentials (its recorded
        command), so every URL the services hold stays valid and Redis comes back with its
        queues and job records (append-only file)."""
        procs = self.processes(state)
        for name in (n for n in INFRA if not procs[n].alive()):
            log.info("restarting %s on port %d", name, _infra_port(state, name))
            server = restart_server(
                name, procs[name].cmd, _infra_port(state, name), Path(procs[name].log)
            )
            state["processes"][name] = _record(server)
            self._save(state)

    def _service_env(
        self, servers: dict[str, ServerProcess], access: str, secret: str, redis_password: str
    ) -> dict[str, str]:
        """The settings every service of the stack gets (on top of the caller's PROCROP_*)."""
        inherited = {k: v for k, v in os.environ.items() if k.startswith("PROCROP_")}
        api_keys = self.settings.api_key_list or [secrets.token_urlsafe(24)]
        return {
            **inherited,
            "PROCROP_HOME": str(self.settings.home),
            "PROCROP_STORAGE__BACKEND": "s3",
            "PROCROP_STORAGE__ENDPOINT": f"127.0.0.1:{servers['s3'].port}",
            "PROCROP_STORAGE__ACCESS_KEY": access,
            "PROCROP_STORAGE__SECRET_KEY": secret,
            "PROCROP_STORAGE__BUCKET": self.settings.storage.bucket,
            "PROCROP_MILVUS__URI": f"http://127.0.0.1:{servers['milvus'].port}",
            "PROCROP_QUEUE__REDIS_URL": (
                f"redis://:{redis_password}@127.0.0.1:{servers['redis'].port}/0"
            ),
            "PROCROP_API_KEYS": ",".join(api_keys),
            "PROCROP_GATEWAY__HOST": "127.0.0.1",
            "PROCROP_GATEWAY__PORT": str(free_port()),
        }

    @staticmethod
    def _service_commands(state: dict[str, Any]) -> dict[str, list[str]]:
        base = [sys.executable, "-m", "procrop"]
        commands = {f"worker-{q}": [*base, "worker", q] for q in WORKER_QUEUES}
        return {**commands, "gateway": [*base, "gateway"]}

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        log_path = self.dir / f"{name}.log"
        with log_path.open("ab") as handle:
            proc = subprocess.Popen(
                cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**_clean_environ(), **env},
            )  # fmt: skip
        started = _start_time(proc.pid)
        if started is None:
            raise ProCropError(f"{name} exited at once; see {log_path}")
        return {"pid": proc.pid, "start_time": started, "log": str(log_path), "cmd": cmd}

    def _wait_ready(
        self, state: dict[str, Any], commands: dict[str, list[str]], spawned: set[str]
    ) -> None:
        """Until the gateway is ready and every worker answers a ping.

        A service this call started that exits is an error (its log says why). One that was
        already running and exits now is started again, once: a process just SIGKILLed counts as
        running until the kernel has torn it down, which can take a moment on a loaded machine."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = [f"worker-{q}" for q in WORKER_QUEUES] + ["gateway"]
        app = _celery(state)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc = StackProcess(name=name, **state["processes"][name])
                if not proc.alive():
                    if name in spawned:
                        raise ProCropError(f"{name} exited during start-up; see {proc.log}")
                    log.warning("%s exited while the stack came up; starting it again", name)
                    state["processes"][name] = self._spawn(name, commands[name], state["env"])
                    spawned.add(name)
                    self._save(state)
                elif _ready(name, state, app):
                    pending.remove(name)
            time.sleep(0.3)
        if pending:
            raise ProCropError(
                f"not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(pending)} "
                f"(logs in {self.dir})"
            )

    def down(self) -> list[str]:
        """Stop every process of the stack that is still the one it started; returns their names."""
        state = self.load()
        if state is None:
            return []
        stopped = []
        procs = self.processes(state)
        order = [*(n for n in procs if n not in INFRA), *INFRA]  # services before their servers
        for name in order:
            if name in procs and procs[name].alive():
                _stop(procs[name], signal.SIGKILL if name == "s3" else signal.SIGTERM)
                stopped.append(name)
        self.state_path.unlink()
        return stopped

    def status(self) -> dict[str, Any]:
        state = self.load()
        if state is None:
            return {"running": False, "processes": {}}
        procs = self.processes(state)
        return {
            "running": all(p.alive() for p in procs.values()),
            "processes": {
                n: {"pid": p.pid, "alive": p.alive(), "log": p.log} for n, p in procs.items()
            },
            **state["endpoints"],
        }

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            **state["endpoints"],
            "api_key": state["env"]["PROCROP_API_KEYS"].split(",")[0],
            "home": str(self.settings.home),
            "pids": {n: p["pid"] for n, p in state["processes"].items()},
        }


def _record(server: ServerProcess) -> dict[str, Any]:
    started = _start_time(server.proc.pid)
    return {"pid": server.proc.pid, "start_time": started, "log": str(server.log_path),
            "cmd": list(map(str, server.proc.args))}  # type: ignore[arg-type]  # fmt: skip


def _infra_port(state: dict[str, Any], name: str) -> int:
    """The port a stack server was started on, from its endpoint (`host:port`, or a URL)."""
    endpoint = state["endpoints"][name]
    return int(endpoint.rsplit(":", 1)[1].split("/", 1)[0])


def _clean_environ() -> dict[str, str]:
    """The caller's environment without its PROCROP_* (the stack's own settings replace them)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}


def _celery(state: dict[str, Any]) -> Any:
    from shared.queue import create_app
    from shared.settings import load_settings

    return create_app(load_settings(queue={"redis_url": state["env"]["PROCROP_QUEUE__REDIS_URL"]}))


def _ready(name: str, state: dict[str, Any], app: Any) -> bool:
    import urllib.error
    import urllib.request

    if name == "gateway":
        try:
            with urllib.request.urlopen(state["endpoints"]["gateway"] + "/healthz", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False
    from shared.queue import worker_name

    queue = name.removeprefix("worker-")
    if not app.control.ping(destination=[worker_name(queue)], timeout=0.5):
        return False
    if queue not in PRELOADING:
        return True
    # The parent answers pings before its pool process has loaded the models: wait for those.
    import redis

    from shared.worker import loaded_key

    client = redis.Redis.from_url(state["env"]["PROCROP_QUEUE__REDIS_URL"], decode_responses=True)
    return client.get(loaded_key(queue)) == str(state["processes"][name]["pid"])


def _stop(proc: StackProcess, sig: int, timeout_s: float = 15.0) -> None:
    """Signal the process group the process leads (a worker's pool children too), then wait."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.alive():
        os.killpg(proc.pid, signal.SIGKILL)
