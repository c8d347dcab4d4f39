"""deploy/k8s as `kubectl kustomize` renders each overlay: every object valid against the
Kubernetes schemas (kubernetes-validate, offline) or KEDA's CRDs (jsonschema), and consistent with
the code: one Deployment and one ScaledObject per queue of shared/queue.py, grace periods and the
visibility timeout beyond the task limits, images and commands as in docker-compose.yml, secrets
only by reference, locked-down containers, network policies that let only the gateway take
traffic."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.queue import GPU_QUEUES, QUEUES
from shared.settings import QueueSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEDA_CRDS = ROOT.parent / "shared" / "schemas" / "keda"
KUBERNETES_VERSION = "1.32.0"  # the kubectl here; the oldest cluster version these target
OVERLAYS = ("dev", "prod")
Manifest = dict[str, Any]


@cache
def keda_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """KEDA's OpenAPI schemas by (apiVersion, kind)."""
    schemas = {}
    for path in sorted(KEDA_CRDS.glob("keda.sh_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    if not schemas:  # a clone outside the workspace, without ../shared
        pytest.skip(f"KEDA's CRD schemas not found in {KEDA_CRDS}")
    return schemas


def of_kind(docs: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workers(docs: list[Manifest]) -> dict[str, Manifest]:
    """Worker Deployments by the queue they consume (`procrop worker QUEUE`)."""
    found: dict[str, Manifest] = {}
    for deployment in of_kind(docs, "Deployment").values():
        args = container(deployment)["args"]
        if args[0] == "worker":
            assert len(args) == 2 and args[1] not in found, args
            found[args[1]] = deployment
    return found


def container(workload: Manifest) -> Manifest:
    (only,) = pod_template(workload)["spec"]["containers"]
    return only


def pod_template(doc: Manifest) -> Manifest:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    template: Manifest = spec["template"]
    return template


def pod_specs(docs: list[Manifest]) -> dict[str, Manifest]:
    return {
        f"{doc['kind']}/{doc['metadata']['name']}": pod_template(doc)["spec"]
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")
    }


def settings_map(docs: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = of_kind(docs, "ConfigMap")["procrop-settings"]["data"]
    return data


def environment(
    docs: list[Manifest], workload: Manifest, secrets: str = "s3cr3t"
) -> dict[str, str]:
    """A container's environment as the kubelet makes it: envFrom first, then env in order,
    `$(VAR)` expanded from what is defined before; secrets read as `secrets`."""
    env: dict[str, str] = {}
    for source in container(workload).get("envFrom", []):
        env.update(of_kind(docs, "ConfigMap")[source["configMapRef"]["name"]]["data"])
    for var in container(workload).get("env", []):
        if "value" in var:
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var["value"]):
                assert ref in env, f"{var['name']} uses $({ref}), not defined before it"
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
        else:
            env[var["name"]] = secrets
    return env


def queue_settings(docs: list[Manifest], workload: Manifest) -> QueueSettings:
    """The queue settings a pod runs with (its PROCROP_QUEUE__* variables over the defaults)."""
    prefix = "PROCROP_QUEUE__"
    values = {
        name[len(prefix) :].lower(): value
        for name, value in environment(docs, workload).items()
        if name.startswith(prefix)
    }
    return QueueSettings.model_validate(values)


# --- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    errors = []
    for doc in rendered[overlay]:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors


def test_the_kubernetes_validator_rejects_a_wrong_field() -> None:
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
              "spec": {"replicas": "two", "selector": {}, "template": {}}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_keda_object_validates_against_kedas_crds(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    keda = [doc for doc in rendered[overlay] if doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        schema = keda_schemas()[(doc["apiVersion"], doc["kind"])]
        jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)


def test_the_keda_schema_rejects_a_scaled_object_without_target() -> None:
    schema = keda_schemas()[("keda.sh/v1alpha1", "ScaledObject")]
    broken = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
              "spec": {"triggers": [{"type": "redis", "metadata": {"listName": "embed"}}]}}  # fmt: skip
    with pytest.raises(jsonschema.ValidationError, match="scaleTargetRef"):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_the_index_job_validates() -> None:
    job = yaml.safe_load((K8S / "jobs" / "index-job.yaml").read_text())
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


# --- one pool per queue, scaled on its list -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_queue_has_exactly_one_deployment_consuming_it(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    assert set(workers(rendered[overlay])) == set(QUEUES)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_queue_has_exactly_one_scaled_object_watching_it(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    pools = workers(docs)
    watched: dict[str, list[str]] = {}
    for scaled in of_kind(docs, "ScaledObject").values():
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis"
        queue = trigger["metadata"]["listName"]
        watched.setdefault(queue, []).append(scaled["spec"]["scaleTargetRef"]["name"])
    assert watched == {queue: [pools[queue]["metadata"]["name"]] for queue in QUEUES}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_read_the_pods_redis(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    """Same address and database as the pods' PROCROP_QUEUE__REDIS_URL, the password from the
    Secret the pods read."""
    docs = rendered[overlay]
    auth = of_kind(docs, "TriggerAuthentication")
    pools = workers(docs)
    for scaled in of_kind(docs, "ScaledObject").values():
        (trigger,) = scaled["spec"]["triggers"]
        meta = trigger["metadata"]
        deployment = pools[meta["listName"]]
        env = environment(docs, deployment, secrets="pw")
        assert env["PROCROP_QUEUE__REDIS_URL"] == (
            f"redis://:pw@{env[meta['addressFromEnv']]}/{meta['databaseIndex']}"
        )
        (ref,) = auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
        password = next(v for v in container(deployment)["env"] if v["name"] == "REDIS_PASSWORD")
        assert ref["parameter"] == "password"
        assert {"name": ref["name"], "key": ref["key"]} == password["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pools_scale_to_zero_after_a_cooldown_longer_than_a_task(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    pools = workers(docs)
    by_queue = {
        s["spec"]["triggers"][0]["metadata"]["listName"]: s
        for s in of_kind(docs, "ScaledObject").values()
    }
    for queue, scaled in by_queue.items():
        spec, meta = scaled["spec"], scaled["spec"]["triggers"][0]["metadata"]
        limits = queue_settings(docs, pools[queue])
        if queue in GPU_QUEUES:
            assert spec["minReplicaCount"] == 0, queue
        assert int(meta["activationListLength"]) >= 0 and int(meta["listLength"]) >= 1
        assert spec["cooldownPeriod"] > limits.time_limit_s, queue
        assert spec["maxReplicaCount"] >= max(1, spec["minReplicaCount"])


def test_the_pool_maxima_come_from_the_overlays(rendered: dict[str, list[Manifest]]) -> None:
    maxima = {
        overlay: {n: s["spec"]["maxReplicaCount"] for n, s in of_kind(docs, "ScaledObject").items()}
        for overlay, docs in rendered.items()
    }
    assert maxima["dev"] != maxima["prod"]
    assert all(maxima["prod"][name] >= maxima["dev"][name] for name in maxima["dev"])


# --- graceful scale-down ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_removed_worker_finishes_or_returns_its_task(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    """SIGTERM -> warm shutdown (tests/shared/test_worker_shutdown.py): the pod's grace period
    outlasts the hard limit (so the soft one too). The visibility timeout is a lease the worker
    renews while it lives, warm shutdown included (shared/leases.py; the shutdown test runs a
    task longer than it), so it need not outlast the hard limit: it bounds how long a dead
    pod's task waits, and stays well under the grace period."""
    docs = rendered[overlay]
    for queue, deployment in workers(docs).items():
        limits = queue_settings(docs, deployment)  # validates soft <= hard
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > limits.time_limit_s >= limits.soft_time_limit_s, queue
        assert limits.visibility_timeout_s < grace, queue
        # prefork: the parent answers --check while a pool process runs a long task
        assert limits.pool == "prefork"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_pools_run_one_process_per_gpu(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    for queue, deployment in workers(docs).items():
        resources = container(deployment)["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        spec = deployment["spec"]["template"]["spec"]
        if overlay == "prod" and queue in GPU_QUEUES:
            assert gpus == resources["requests"]["nvidia.com/gpu"] == 1, queue
            assert queue_settings(docs, deployment).concurrency == 1
            assert spec["nodeSelector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:  # dev runs the lite profile on CPUs
            assert gpus is None and "nodeSelector" not in spec, queue


# --- probes, security, secrets ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ping_the_worker_or_ask_the_gateway(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    for queue, deployment in workers(docs).items():
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container(deployment)[probe]["exec"]["command"]
            assert command == ["procrop", "worker", queue, "--check"]
    gateway = container(of_kind(docs, "Deployment")["procrop-gateway"])
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_without_capabilities(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    for name, spec in pod_specs(rendered[overlay]).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] >= 10000, name
        assert spec["automountServiceAccountToken"] is False, name
        for box in spec["containers"]:
            security = box["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(box["resources"][bound]), name


def created_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, as deploy/k8s/create-secrets.sh makes them in namespace procrop."""
    done = subprocess.run(
        [str(K8S / "create-secrets.sh"), "prod", "--dry-run"],
        capture_output=True, text=True, timeout=60, check=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "MILVUS_TOKEN": "root:pw"},
    )  # fmt: skip
    return {
        doc["metadata"]["name"]: set(doc["data"])
        for doc in yaml.safe_load_all(done.stdout)
        if doc and doc["metadata"]["namespace"] == "procrop"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inline(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    assert not of_kind(docs, "Secret")
    secrets = created_secrets()
    secret_like = re.compile(r"KEY|PASSWORD|TOKEN|SECRET", re.IGNORECASE)
    assert not [k for k in settings_map(docs) if secret_like.search(k)]
    for name, spec in pod_specs(docs).items():
        for box in spec["containers"]:
            for var in box.get("env", []):
                if secret_like.search(var["name"]):
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in secrets[ref["name"]], (name, var["name"])
    for auth in of_kind(docs, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]


# --- network policies and metrics -------------------------------------------------------------


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for rule in selector.get("matchExpressions", []):
        assert rule["operator"] == "In"
        if labels.get(rule["key"]) not in rule["values"]:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_takes_traffic(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    docs = rendered[overlay]
    policies = of_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    open_ports: dict[str, set[int]] = {}
    for deployment in of_kind(docs, "Deployment").values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for policy in policies.values():
            if selects(policy["spec"]["podSelector"], labels):
                for rule in policy["spec"].get("ingress", []):
                    ports = {p["port"] for p in rule["ports"]}
                    open_ports.setdefault(deployment["metadata"]["name"], set()).update(ports)
    assert open_ports.pop("procrop-gateway") == {8080}
    metrics = int(settings_map(docs)["PROCROP_QUEUE__METRICS_PORT"])
    assert open_ports == {workers(docs)[q]["metadata"]["name"]: {metrics} for q in QUEUES}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_scraped_on_their_metrics_port(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    port = int(settings_map(docs)["PROCROP_QUEUE__METRICS_PORT"])
    for deployment in workers(docs).values():
        notes = deployment["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == port
        (named,) = [p for p in container(deployment)["ports"] if p["name"] == "metrics"]
        assert named["containerPort"] == port
        assert queue_settings(docs, deployment).metrics_host == "0.0.0.0"


# --- the same images and commands as docker-compose.yml ----------------------------------------


def image_name(image: str) -> str:
    """`registry/path/procrop-embedder:tag` -> `procrop-embedder`."""
    return image.rsplit("/", 1)[-1].split(":", 1)[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retention_runs_hourly_as_procrop_sweep(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    docs = rendered[overlay]
    sweeps = [c for c in of_kind(docs, "CronJob").values() if container(c)["args"][0] == "sweep"]
    assert len(sweeps) == 1
    (cron,) = sweeps
    minute, hour, *rest = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour == "*" and rest == ["*", "*", "*"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # Shorter than the hour between runs, so runs never pile up.
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600
    box = container(cron)
    # The arguments are ones the real command accepts.
    from procrop.cli import cli

    command = cli.get_command(click.Context(cli), "sweep")
    assert command is not None
    command.make_context("sweep", list(box["args"][1:]))
    # It reaches the job records and the bucket the gateway and workers use.
    env, gateway = (
        environment(docs, cron),
        environment(docs, of_kind(docs, "Deployment")["procrop-gateway"]),
    )
    for name in (
        "PROCROP_QUEUE__REDIS_URL",
        "PROCROP_STORAGE__ACCESS_KEY",
        "PROCROP_STORAGE__SECRET_KEY",
        "PROCROP_STORAGE__BUCKET",
        "PROCROP_STORAGE__ENDPOINT",
    ):
        assert env.get(name) == gateway.get(name), name
    indexer = container(workers(docs)["index"])
    assert box["image"] == indexer["image"]
    # The backends-only egress policy of the workers selects it.
    policy = of_kind(docs, "NetworkPolicy")["procrop-to-backends"]
    assert selects(policy["spec"]["podSelector"], pod_template(cron)["metadata"]["labels"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_and_commands_match_docker_compose(
    rendered: dict[str, list[Manifest]], overlay: str, compose: dict[str, Any]
) -> None:
    by_image = {image_name(s["image"]): (name, s) for name, s in compose.items() if "build" in s}
    for queue, deployment in workers(rendered[overlay]).items():
        box = container(deployment)
        name, service = by_image[image_name(box["image"])]
        assert service["build"]["dockerfile"] == "deploy/docker/worker.Dockerfile"
        assert service["build"]["args"]["QUEUE"] == queue, name
        # Compose runs the image's default command, `procrop worker $QUEUE`.
        assert "command" not in service and box["args"] == ["worker", queue]
        assert service["healthcheck"]["test"] == ["CMD", *box["livenessProbe"]["exec"]["command"]]
        assert box["image"].endswith(":dev" if overlay == "dev" else ":0.1.0")
    gateway = container(of_kind(rendered[overlay], "Deployment")["procrop-gateway"])
    name, service = by_image[image_name(gateway["image"])]
    assert name == "gateway" and service["command"] == gateway["args"] == ["gateway"]
