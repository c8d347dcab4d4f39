"""docker-compose.yml as `docker-compose config` resolves it with .env.example: every service, GPUs
where they belong, health checks, loopback-only ports, Dockerfiles that exist and agree with
pyproject.toml, a gateway image without torch, and one worker Dockerfile whose build argument is
the queue its image consumes. Needs the docker-compose binary and sh, no engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.queue import QUEUES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROCROP_SERVICES = {
    "gateway", "embedder", "retriever", "indexer", "cropper", "outpainter", "sweeper"
}  # fmt: skip
INFRA_SERVICES = {"redis", "minio", "etcd", "milvus"}
WORKER_SERVICES = PROCROP_SERVICES - {"gateway", "sweeper"}
BUILT_SERVICES = WORKER_SERVICES | {"gateway"}  # the sweeper runs the indexer's image
GPU_SERVICES = {"embedder", "cropper", "outpainter"}
WORKER_DOCKERFILE = ROOT / "deploy" / "docker" / "worker.Dockerfile"
MODEL_PACKAGES = {
    "torch",
    "torchvision",
    "segment-anything",
    "diffusers",
    "transformers",
    "onnxruntime",
}
REQUIRED_SECRETS = (
    "PROCROP_API_KEYS",
    "PROCROP_STORAGE__ACCESS_KEY",
    "PROCROP_STORAGE__SECRET_KEY",
    "REDIS_PASSWORD",
)
_VARIABLE_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)


def run_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on docker-compose.yml with `env_file`, every profile active."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: run `make setup`")
    command = [binary, "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    # The caller's PROCROP_* variables would override the env file; COMPOSE_* would change files.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCROP_", "COMPOSE_"))}
    return subprocess.run(
        [*command, "--profile", "cad", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The resolved services of docker-compose.yml, by name."""
    result = run_config(ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config["services"]


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return Path(build["context"]) / build.get("dockerfile", "Dockerfile")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of `dockerfile` in order, as (keyword, the rest), continuations joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every `pip install` in the RUN instructions of `dockerfile`."""
    text = dockerfile.read_text().replace("\\\n", " ")
    installs = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            continue
        words = shlex.split(line.removeprefix("RUN "))
        command: list[str] = []
        for word in [*words, "&&"]:
            if word != "&&":
                command.append(word)
                continue
            if command[:2] == ["pip", "install"]:
                installs.append(command[2:])
            command = []
    return installs


def requirements_of(dockerfile: Path) -> list[Requirement]:
    """The packages named on `pip install` command lines of `dockerfile` (not files, not `.`)."""
    return [
        Requirement(arg)
        for args in pip_installs(dockerfile)
        for i, arg in enumerate(args)
        if not arg.startswith("-") and arg != "." and args[i - 1 : i] != ["-r"]
    ]


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def host_ip(port: str | dict[str, Any]) -> str:
    """The host address of a port mapping, short (`IP:HOST:CONTAINER`) or long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else ""


def test_every_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == PROCROP_SERVICES | INFRA_SERVICES


def test_gpu_workers_reserve_one_nvidia_gpu_and_no_one_else(
    services: dict[str, dict[str, Any]],
) -> None:
    with_gpu = {name for name, service in services.items() if gpu_devices(service)}
    assert with_gpu == GPU_SERVICES
    for name in GPU_SERVICES:
        [device] = gpu_devices(services[name])
        assert device["driver"] == "nvidia" and device["count"] == 1, name


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name


def test_every_queue_has_one_worker_that_checks_it(services: dict[str, dict[str, Any]]) -> None:
    queues = {}
    for name in WORKER_SERVICES:
        service = services[name]
        assert "command" not in service, f"{name}: the image runs the queue it was built for"
        queues[name] = service["build"]["args"]["QUEUE"]
        check = ["CMD", "procrop", "worker", queues[name], "--check"]
        assert service["healthcheck"]["test"] == check, name
    assert sorted(queues.values()) == sorted(QUEUES)
    # An image tag built for two queues would run whichever was built last.
    assert len({services[name]["image"] for name in WORKER_SERVICES}) == len(WORKER_SERVICES)


def test_workers_share_one_dockerfile_and_the_gateway_has_its_own(
    services: dict[str, dict[str, Any]],
) -> None:
    assert {dockerfile_of(services[name]) for name in WORKER_SERVICES} == {WORKER_DOCKERFILE}
    assert dockerfile_of(services["gateway"]) != WORKER_DOCKERFILE
    assert "args" not in services["gateway"]["build"]
    leftovers = sorted(p.name for p in WORKER_DOCKERFILE.parent.glob("*Dockerfile"))
    assert leftovers == ["gateway.Dockerfile", "worker.Dockerfile"]


def test_the_queue_comes_last_in_the_worker_image() -> None:
    """Layers up to the queue are the same for every queue: the worker images share them."""
    steps = instructions(WORKER_DOCKERFILE)
    queue_at = steps.index(("ARG", "QUEUE"))
    before, after = steps[:queue_at], steps[queue_at + 1 :]
    assert ("RUN", "pip install .") in before and ("COPY", "procrop ./procrop") in before
    assert {keyword for keyword, _ in after} == {"RUN", "ENV", "ENTRYPOINT", "CMD"}
    assert all("pip" not in rest for keyword, rest in after if keyword == "RUN")
    assert ("ENV", "PROCROP_WORKER_QUEUE=$QUEUE") in after
    assert not any("QUEUE" in rest for _, rest in before)


@pytest.mark.parametrize(("queue", "ok"), [("crop", True), ("index", True), ("nope", False)])
def test_the_worker_image_refuses_to_build_without_a_known_queue(queue: str, ok: bool) -> None:
    """The build's check of its QUEUE argument, run here with this checkout's Python."""
    steps = instructions(WORKER_DOCKERFILE)
    (check,) = [
        rest for keyword, rest in steps[steps.index(("ARG", "QUEUE")) :] if keyword == "RUN"
    ]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "QUEUE": queue}
    done = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) is ok, done.stderr
    if not ok:
        assert "--build-arg QUEUE" in done.stderr and " ".join(QUEUES) in done.stderr


@pytest.mark.parametrize(
    ("args", "runs"),
    [
        ([], "worker crop"),
        (
            ["index", "s3://photos/pro", "--collection", "pro"],
            "index s3://photos/pro --collection pro",
        ),
        (["worker", "embed", "--check"], "worker embed --check"),
    ],
)
def test_the_worker_image_execs_procrop_as_pid_1(
    tmp_path: Path, args: list[str], runs: str
) -> None:
    """The image's ENTRYPOINT and CMD, run by sh as Docker would, with a stand-in `procrop` that
    prints its pid and arguments: no arguments run the image's queue; procrop replaces the shell
    (same pid), so the worker itself receives `docker stop`'s SIGTERM."""
    steps = dict(instructions(WORKER_DOCKERFILE))
    command = [*json.loads(steps["ENTRYPOINT"]), *(args or json.loads(steps["CMD"]))]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "procrop").write_text('#!/bin/sh\necho "$$ $*"\n')
    (bin_dir / "procrop").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PROCROP_WORKER_QUEUE": "crop"}
    shell = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    out, _ = shell.communicate(timeout=30)
    assert shell.returncode == 0
    assert out.strip() == f"{shell.pid} {runs}"


def test_procrop_services_start_after_healthy_infrastructure(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in PROCROP_SERVICES:
        depends_on = services[name]["depends_on"]
        for infra in ("redis", "minio", "milvus"):
            assert depends_on[infra]["condition"] == "service_healthy", (name, infra)


def test_dockerfiles_exist_for_every_procrop_service(services: dict[str, dict[str, Any]]) -> None:
    for name in BUILT_SERVICES:
        assert dockerfile_of(services[name]).is_file(), name
    for name in INFRA_SERVICES:
        assert "build" not in services[name] and ":" in services[name]["image"], name


def test_gateway_image_installs_no_model_libraries(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = dockerfile_of(services["gateway"])
    names = {canonicalize_name(r.name) for r in requirements_of(dockerfile)}
    assert names and not names & MODEL_PACKAGES
    for args in pip_installs(dockerfile):
        assert "-r" not in args, "requirements files could bring torch back"
        assert "." not in args or "--no-deps" in args, "the project's own dependencies hold torch"


def test_dockerfile_pins_agree_with_pyproject(services: dict[str, dict[str, Any]]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])
    }
    for dockerfile in {dockerfile_of(services[name]) for name in BUILT_SERVICES}:
        for requirement in requirements_of(dockerfile):
            name = canonicalize_name(requirement.name)
            assert name in declared, f"{dockerfile.name}: {name} is not in pyproject.toml"
            assert requirement.specifier == declared[name], f"{dockerfile.name}: {requirement}"


def test_host_ports_bind_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert host_ip(port) == "127.0.0.1", (name, port)
    assert [host_ip(p) for p in services["gateway"]["ports"]] == ["127.0.0.1"]


def test_outpainter_runs_only_under_the_cad_profile(services: dict[str, dict[str, Any]]) -> None:
    profiles = {name: service.get("profiles") for name, service in services.items()}
    assert profiles.pop("outpainter") == ["cad"]
    assert not any(profiles.values()), "a plain `up` must start every other service"


def test_api_keys_reach_only_the_gateway(services: dict[str, dict[str, Any]]) -> None:
    with_keys = {
        name for name, s in services.items() if "PROCROP_API_KEYS" in s.get("environment", {})
    }
    assert with_keys == {"gateway"}


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
def test_a_missing_secret_fails_config(secret: str, tmp_path: Path) -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(line for line in lines if not line.startswith(f"{secret}=")))
    result = run_config(env_file)
    assert result.returncode != 0
    assert secret in result.stderr


def test_env_example_documents_every_variable_compose_reads() -> None:
    compose_text = COMPOSE_FILE.read_text()
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose_text))
    for service in yaml.safe_load(compose_text)["services"].values():
        environment = service.get("environment", {})
        read |= {key for key, value in environment.items() if value is None}  # passed through
    example = ENV_EXAMPLE.read_text().splitlines()
    documented = {}
    for i, line in enumerate(example):
        match = _VARIABLE_LINE.match(line)
        if match:
            above = example[i - 1] if i else ""
            documented[match[1]] = above.startswith("#") and not _VARIABLE_LINE.match(above)
    assert read <= set(documented), sorted(read - set(documented))
    assert all(documented.values()), [k for k, has_comment in documented.items() if not has_comment]


def test_redis_is_durable_and_locked(services: dict[str, dict[str, Any]]) -> None:
    """Redis runs deploy/redis/redis.conf (append-only file) with a password, which the
    services' Redis URL carries."""
    redis = services["redis"]
    command = redis["command"]
    assert command[:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert command[2:] == ["--requirepass", "change-me-redis-password"]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in redis["volumes"]]
    assert any(
        str(ROOT / "deploy" / "redis" / "redis.conf") in m
        and "/usr/local/etc/redis/redis.conf" in m
        for m in mounts
    ), mounts
    assert "appendonly yes" in (ROOT / "deploy" / "redis" / "redis.conf").read_text()
    for name in PROCROP_SERVICES:
        url = services[name]["environment"]["PROCROP_QUEUE__REDIS_URL"]
        assert url == "redis://:change-me-redis-password@redis:6379/0"


def test_the_sweeper_runs_procrop_sweep_hourly_in_the_indexer_image(
    services: dict[str, dict[str, Any]],
) -> None:
    import click

    from procrop.cli import cli

    sweeper, indexer = services["sweeper"], services["indexer"]
    assert sweeper["image"] == indexer["image"] and "build" not in sweeper
    args = sweeper["command"]
    assert args[0] == "sweep"
    command = cli.get_command(click.Context(cli), "sweep")
    assert command is not None
    options = command.make_context("sweep", list(args[1:])).params  # the real CLI accepts them
    assert options["every_s"] == 3600 and options["grace_s"] >= 3600
    assert sweeper["healthcheck"]["test"] == ["CMD", "procrop", "sweep", "--check"]
    # The same Redis and bucket as the services whose objects it deletes.
    assert sweeper["environment"] == indexer["environment"]
