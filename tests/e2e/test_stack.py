"""End to end over HTTP: `procrop stack up` (real Redis, S3, Milvus Lite server, one Celery worker
per queue, the gateway, as separate processes), crop and index jobs, failures, `stack down`.

The stack is started once for the module with short task limits (time limit 10 s) and the
default 30 s lease (shared/leases.py), so a task whose worker is killed comes back within about
35 s. The fault tests come last: a Redis SIGKILLed under jobs, a crop worker SIGKILLed under load.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.jobs import JobStore

pytestmark = pytest.mark.slow
ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
PROCROP = [sys.executable, "-m", "procrop"]


def _procrop(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    return subprocess.run(
        [*PROCROP, *args], env={**base, "PROCROP_HOME": str(home), **(env or {})},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("stack-home")
    env = {
        "PROCROP_API_KEYS": f"{ALICE},{BOB}",
        "PROCROP_GATEWAY__MAX_UPLOAD_MB": "1",
        "PROCROP_QUEUE__TIME_LIMIT_S": "10",
        "PROCROP_QUEUE__SOFT_TIME_LIMIT_S": "8",
        "PROCROP_QUEUE__INDEX_BATCH": "4",
        "PROCROP_QUEUE__RECOVER_AFTER_S": "6",  # lost messages sent again soon (shared/recovery)
        "PROCROP_QUEUE__RECOVER_EVERY_S": "2",
    }
    up = _procrop(home, "stack", "up", env=env)
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout.strip().splitlines()[-1])  # the last line is JSON
    state = json.loads((home / "stack" / "stack.json").read_text())
    yield {**summary, "home": home, "env": state["env"]}
    down = _procrop(home, "stack", "down")
    assert down.returncode == 0, down.stderr
    for pid in summary["pids"].values():  # every process it started is gone
        assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid)


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@pytest.fixture(scope="module")
def client(stack: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack["gateway"], timeout=60) as c:
        yield c


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit(client: httpx.Client, photo: Path, key: str = ALICE, **fields: Any) -> httpx.Response:
    with photo.open("rb") as handle:
        return client.post(
            "/v1/crops", headers=_auth(key), files={"image": (photo.name, handle, "image/jpeg")},
            data={k: str(v) for k, v in fields.items()},
        )  # fmt: skip


def _wait_done(client: httpx.Client, job_id: str, key: str = ALICE, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/crops/{job_id}", headers=_auth(key)).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done after {timeout_s} s: {body}")


def _embedded(photo: Path, *args: str) -> dict[str, Any]:
    """`procrop crop --json` on the photo: the embedded, in-process answer."""
    out = subprocess.run(
        [*PROCROP, "crop", str(photo), "--json", *args], capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    result = json.loads(out.stdout)
    return {k: result[k] for k in ("width", "height", "crops")}


def test_stack_up_reports_gateway_and_status(stack: dict[str, Any]) -> None:
    assert stack["gateway"].startswith("http://127.0.0.1:")
    status = _procrop(stack["home"], "stack", "status")
    assert status.returncode == 0
    body = json.loads(status.stdout)
    assert body["running"] is True
    assert set(body["processes"]) == {
        "redis", "s3", "milvus", "worker-embed", "worker-retrieve", "worker-crop",
        "worker-index", "worker-outpaint", "gateway",
    }  # fmt: skip
    again = _procrop(stack["home"], "stack", "up")  # idempotent: nothing new is started
    assert json.loads(again.stdout.strip().splitlines()[-1])["pids"] == stack["pids"]


def test_crop_round_trip_equals_embedded(client: httpx.Client, photo_dir: Path) -> None:
    for photo, ratios in [
        (photo_dir / "chelsea.jpg", []),
        (photo_dir / "rocket.jpg", ["16:9", "1:1"]),
    ]:
        response = _submit(client, photo, n=3, wait=30, aspect_ratios=",".join(ratios))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "succeeded"
        assert set(body["timings"]) == {"embed", "retrieve", "crop"}
        extra = [arg for r in ratios for arg in ("-a", r)]
        assert body["result"] == _embedded(photo, "-n", "3", *extra)


def test_crop_async_then_get(client: httpx.Client, photo_dir: Path) -> None:
    response = _submit(client, photo_dir / "coffee.jpg", n=2)
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert response.headers["location"] == f"/v1/crops/{job_id}"
    body = _wait_done(client, job_id)
    assert body["status"] == "succeeded" and len(body["result"]["crops"]) == 2
    job = client.get(f"/v1/jobs/{job_id}", headers=_auth(ALICE)).json()
    assert job["kind"] == "crop" and job["result"] == body["result"]


def test_auth_and_ownership(client: httpx.Client, photo_dir: Path) -> None:
    assert _submit(client, photo_dir / "coffee.jpg", key="wrong-key-0123456789").status_code == 401
    assert client.post("/v1/crops").status_code == 401
    job_id = _submit(client, photo_dir / "coffee.jpg", wait=30).json()["job_id"]
    mine = client.get(f"/v1/crops/{job_id}", headers=_auth(ALICE))
    theirs = client.get(f"/v1/crops/{job_id}", headers=_auth(BOB))
    assert mine.status_code == 200
    assert theirs.status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=_auth(BOB)).status_code == 404


def test_bad_uploads_get_4xx(client: httpx.Client, tmp_path: Path) -> None:
    corrupt = tmp_path / "photo.jpg"
    corrupt.write_bytes(os.urandom(5000))
    response = _submit(client, corrupt)
    assert response.status_code == 415
    assert "not a readable" in response.json()["detail"]
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(2 * 1024 * 1024))  # over the stack's 1 MiB limit
    response = _submit(client, big)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def test_burst_of_20_jobs_from_10_clients(stack: dict[str, Any], photo_dir: Path) -> None:
    photos = sorted(photo_dir.glob("*.jpg"))

    def one(i: int) -> dict[str, Any]:
        with httpx.Client(base_url=stack["gateway"], timeout=120) as c:
            response = _submit(c, photos[i % len(photos)], n=2, wait=90)
            assert response.status_code in (200, 202), response.text
            return _wait_done(c, response.json()["job_id"], timeout_s=120)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(20)))
    assert [r["status"] for r in results] == ["succeeded"] * 20
    assert len({r["job_id"] for r in results}) == 20
    by_photo: dict[int, list[Any]] = {}
    for i, r in enumerate(results):  # the same photo gets the same crops, whatever the load
        by_photo.setdefault(i % len(photos), []).append(r["result"])
    assert all(all(r == rs[0] for r in rs) for rs in by_photo.values())


def test_index_job_over_http(stack: dict[str, Any], client: httpx.Client, photo_dir: Path) -> None:
    from shared.settings import load_settings
    from shared.storage import build_object_store
    from shared.vector_index import open_index

    settings = load_settings(**_settings_overrides(stack))
    store = build_object_store(settings)
    for photo in sorted(photo_dir.glob("*.jpg")):
        store.put(f"pro/{photo.name}", photo.read_bytes())
    store.put("pro/broken.jpg", b"not a photo")
    response = client.post(
        "/v1/collections/pro_e2e/index", headers=_auth(ALICE), json={"source": "pro/"}
    )
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    deadline, job = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=_auth(ALICE)).json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"done": 7, "total": 7}  # 2 batches of 4 (batch size 4)
    assert job["result"]["added"] == 6 and len(job["result"]["failed"]) == 1
    owner = hashlib.sha256(ALICE.encode()).hexdigest()[:16]
    assert open_index(settings).count(f"t{owner}_pro_e2e") == 6  # Alice's own "pro_e2e"


def test_no_index_request_changes_another_tenants_crops(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    """Alice uploads photos, then asks to index every source she can name (uploads, other
    buckets, the system's areas, a legitimate prefix) into every collection she can name (the crop
    model's own index included); Bob's crops stay exactly what they were."""
    from shared.settings import load_settings
    from shared.storage import build_object_store
    from shared.vector_index import open_index

    settings = load_settings(**_settings_overrides(stack))
    photos = sorted(photo_dir.glob("*.jpg"))
    before = [_submit(client, p, key=BOB, n=3, wait=30).json()["result"] for p in photos[:3]]
    index = open_index(settings)
    [crop_index] = [c for c in index.list_collections() if c.startswith("bundle_")]
    rows = index.count(crop_index)
    for photo in photos:  # uploads/ now holds Alice's photos
        assert _submit(client, photo, n=1, wait=30).status_code == 200
    store = build_object_store(settings)
    for photo in photos:
        store.put(f"mine/{photo.name}", photo.read_bytes())
    bucket = settings.storage.bucket
    sources = ["uploads/", f"s3://{bucket}/uploads/", f"s3://{bucket}//uploads", "./uploads/",
               "jobs/", "features/", "collections/", f"s3://{bucket}/", "s3://other/x/", "mine/"]  # fmt: skip
    accepted = []
    for name in (crop_index, "fcdb", "pro_e2e"):
        for source in sources:
            response = client.post(
                f"/v1/collections/{name}/index", headers=_auth(ALICE), json={"source": source}
            )
            assert response.status_code in (202, 422), response.text
            if response.status_code == 202:
                accepted.append((source, response.json()["job_id"]))
    assert {source for source, _ in accepted} == {"mine/"}  # the only one she may read
    for _, job_id in accepted:
        _poll(lambda j=job_id: _job(client, j)["status"] == "succeeded", "Alice's index job", 90)
    assert index.count(crop_index) == rows
    after = [_submit(client, p, key=BOB, n=3, wait=30).json()["result"] for p in photos[:3]]
    assert after == before


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{job_id}", headers=_auth(ALICE)).json()  # type: ignore[no-any-return]


def _settings_overrides(stack: dict[str, Any]) -> dict[str, Any]:
    env = stack["env"]
    return {
        "storage": {
            "backend": "s3", "endpoint": env["PROCROP_STORAGE__ENDPOINT"],
            "access_key": env["PROCROP_STORAGE__ACCESS_KEY"],
            "secret_key": env["PROCROP_STORAGE__SECRET_KEY"],
        },
        "milvus": {"uri": env["PROCROP_MILVUS__URI"]},
    }  # fmt: skip


def test_cancelled_job_skips_its_remaining_stages(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    jobs = JobStore.from_url(stack["env"]["PROCROP_QUEUE__REDIS_URL"])
    _kill_worker(stack, "worker-crop")  # the job stops before crop
    job_id = _submit(client, photo_dir / "camera.jpg").json()["job_id"]
    _poll(lambda: "retrieve" in jobs.get(job_id).timings, "the job to reach the crop queue")
    response = client.delete(f"/v1/crops/{job_id}", headers=_auth(ALICE))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert _procrop(stack["home"], "stack", "up").returncode == 0  # the crop worker is back
    _poll(  # the new worker's first fetch; slow under a loaded machine
        lambda: jobs.get(job_id).deliveries.get("crop") == 1, "the crop task to be delivered", 90
    )
    body = client.get(f"/v1/crops/{job_id}", headers=_auth(ALICE)).json()
    assert body["status"] == "cancelled" and body["result"] is None
    assert "crop" not in jobs.get(job_id).timings  # it never ran
    assert client.delete(f"/v1/crops/{job_id}", headers=_auth(ALICE)).status_code == 409


def test_worker_killed_mid_task_job_still_succeeds_once(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    """SIGKILL the crop worker while its task waits on a (paused) S3 server; restart it; the
    task comes back after the visibility timeout and the job succeeds with one result."""
    jobs = JobStore.from_url(stack["env"]["PROCROP_QUEUE__REDIS_URL"])
    pids = stack["pids"]
    _kill_worker(stack, "worker-crop")  # no crop worker for now
    photo = photo_dir / "astronaut.jpg"
    job_id = _submit(client, photo, n=3).json()["job_id"]
    _poll(lambda: "retrieve" in jobs.get(job_id).timings, "the job to reach the crop queue")
    os.kill(pids["s3"], signal.SIGSTOP)
    try:
        assert _procrop(stack["home"], "stack", "up").returncode == 0  # a new crop worker
        _poll(lambda: jobs.get(job_id).deliveries.get("crop") == 1, "the crop task to start")
        time.sleep(0.5)  # it now waits on S3
        os.killpg(_current_pid(stack, "worker-crop"), signal.SIGKILL)
    finally:
        os.kill(pids["s3"], signal.SIGCONT)
    assert jobs.get(job_id).status == "running"
    assert _procrop(stack["home"], "stack", "up").returncode == 0  # restarted
    body = _wait_done(client, job_id, timeout_s=90)
    assert body["status"] == "succeeded"
    assert jobs.get(job_id).deliveries["crop"] == 2
    assert body["result"] == _embedded(photo, "-n", "3")
    from shared.settings import load_settings
    from shared.storage import build_object_store

    store = build_object_store(load_settings(**_settings_overrides(stack)))
    assert list(store.list(f"jobs/{job_id}/")) == [
        f"jobs/{job_id}/neighbors.safetensors", f"jobs/{job_id}/result.json",
    ]  # fmt: skip


def _kill_worker(stack: dict[str, Any], name: str) -> None:
    """SIGKILL the worker's whole process group and wait until none of it runs.

    Until the kernel has torn a killed process down (slow for a large process on a loaded
    machine) its sockets stay open, and Redis hands the next message pushed to its queue to the
    BRPOP it left waiting: that message is lost (kombu's Redis transport records a delivery as
    unacknowledged only after reading it; seen: one of ten jobs submitted just after the kill
    never finished). Tests whose jobs should wait in the queue for a new worker wait for this."""
    group = _current_pid(stack, name)
    os.killpg(group, signal.SIGKILL)
    _poll(lambda: not _group_running(group), f"{name}'s processes to exit")


def _group_running(group: int) -> bool:
    """Whether a process of the group still runs (a zombie has closed its sockets)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited while we looked
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            return True
    return False


def _current_pid(stack: dict[str, Any], name: str) -> int:
    state = json.loads((stack["home"] / "stack" / "stack.json").read_text())
    return int(state["processes"][name]["pid"])


def _poll(ready: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _job_objects(stack: dict[str, Any], job_id: str) -> list[str]:
    from shared.settings import load_settings
    from shared.storage import build_object_store

    return list(
        build_object_store(load_settings(**_settings_overrides(stack))).list(f"jobs/{job_id}/")
    )


def test_a_job_whose_message_was_lost_is_sent_again_and_succeeds_once(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    """The crop message of a job is taken out of Redis while no crop worker runs, as a dying
    worker's BRPOP takes one; the gateway's recovery finds the job stalled with no message
    holding it and sends it again: it succeeds, with one result, the crops `procrop crop` gives."""
    import redis

    from shared.recovery import job_id_of

    jobs = JobStore.from_url(stack["env"]["PROCROP_QUEUE__REDIS_URL"])
    broker = redis.Redis.from_url(stack["env"]["PROCROP_QUEUE__REDIS_URL"])
    _kill_worker(stack, "worker-crop")
    photo = photo_dir / "coffee.jpg"
    job_id = _submit(client, photo, n=2).json()["job_id"]
    _poll(lambda: "retrieve" in jobs.get(job_id).timings, "the job to reach the crop queue")
    _poll(lambda: any(job_id_of(m) == job_id for m in broker.lrange("crop", 0, -1)), "its message")
    lost = [m for m in broker.lrange("crop", 0, -1) if job_id_of(m) == job_id]
    assert len(lost) == 1 and broker.lrem("crop", 1, lost[0]) == 1
    assert _procrop(stack["home"], "stack", "up").returncode == 0  # a crop worker again
    body = _wait_done(client, job_id, timeout_s=90)
    assert body["status"] == "succeeded"
    assert body["result"] == _embedded(photo, "-n", "2")
    record = broker.hgetall(f"procrop:job:{job_id}")
    assert record[b"resent"] == b"1" and record[b"n.embed"] == b"2"  # sent again from embed
    assert _job_objects(stack, job_id) == [
        f"jobs/{job_id}/neighbors.safetensors", f"jobs/{job_id}/result.json",
    ]  # fmt: skip


def test_redis_is_locked_and_its_files_private(stack: dict[str, Any]) -> None:
    import redis

    url = stack["env"]["PROCROP_QUEUE__REDIS_URL"]
    assert redis.Redis.from_url(url).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=int(url.rsplit(":", 1)[1].split("/")[0])).get("anything")
    for path in ("stack.json", "redis/redis.conf", "s3/s3.json", "s3/security.toml"):
        assert (stack["home"] / "stack" / path).stat().st_mode & 0o077 == 0, path


def test_redis_sigkilled_with_10_jobs_in_flight(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    """Ten jobs wait in the crop queue (its worker is down) when Redis is SIGKILLed; `stack up`
    brings Redis back on its port with its append-only file, and the crop worker: the same gateway
    URL, all ten jobs succeed (each with one result), the workers that rode out the outage serve
    new jobs. (Not a stopped worker: a message in a BRPOP reply it never read would be lost,
    kombu's Redis transport moves it to `unacked` only after reading it.)"""
    jobs = JobStore.from_url(stack["env"]["PROCROP_QUEUE__REDIS_URL"])
    photos = sorted(photo_dir.glob("*.jpg"))
    _kill_worker(stack, "worker-crop")
    ids = [_submit(client, photos[i % len(photos)], n=2).json()["job_id"] for i in range(10)]
    _poll(lambda: all("retrieve" in jobs.get(j).timings for j in ids), "10 jobs at crop", 60)
    time.sleep(1.5)  # appendfsync everysec
    os.kill(_current_pid(stack, "redis"), signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(3)
    up = _procrop(stack["home"], "stack", "up")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout.strip().splitlines()[-1])["gateway"] == stack["gateway"]
    bodies = [_wait_done(client, j, timeout_s=120) for j in ids]
    print(f"Redis SIGKILLed: 10 jobs done {time.monotonic() - killed:.1f} s after the kill")
    assert [b["status"] for b in bodies] == ["succeeded"] * 10
    for job_id, body in zip(ids, bodies, strict=True):
        assert len(body["result"]["crops"]) == 2
        assert _job_objects(stack, job_id) == [
            f"jobs/{job_id}/neighbors.safetensors", f"jobs/{job_id}/result.json",
        ]  # fmt: skip
    fresh = _submit(client, photos[0], n=2, wait=60).json()
    assert fresh["status"] == "succeeded"
    for name in ("worker-embed", "worker-retrieve", "worker-index", "worker-outpaint", "gateway"):
        assert _current_pid(stack, name) == stack["pids"][name]  # rode it out, not restarted


def test_crop_worker_group_sigkilled_mid_load(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    """20 jobs from 5 clients; the crop worker's whole process group is SIGKILLed once crops are
    running, and `stack up` starts a new one: every job succeeds within 150 s, each with exactly
    one result (one result.json, the crops `procrop crop` gives its photo)."""
    jobs = JobStore.from_url(stack["env"]["PROCROP_QUEUE__REDIS_URL"])
    photos = sorted(photo_dir.glob("*.jpg"))[:2]
    expected = {p.name: _embedded(p, "-n", "2") for p in photos}

    def one(i: int) -> tuple[str, str]:
        with httpx.Client(base_url=stack["gateway"], timeout=60) as c:
            return photos[i % 2].name, _submit(c, photos[i % 2], n=2).json()["job_id"]

    with ThreadPoolExecutor(5) as pool:
        first = list(pool.map(one, range(10)))
        _poll(lambda: any("crop" in jobs.get(j).deliveries for _, j in first), "a crop to start")
        os.killpg(_current_pid(stack, "worker-crop"), signal.SIGKILL)
        killed = time.monotonic()
        submitted = first + list(pool.map(one, range(10, 20)))
    assert _procrop(stack["home"], "stack", "up").returncode == 0
    bodies = {
        j: _wait_done(client, j, timeout_s=150 - (time.monotonic() - killed)) for _, j in submitted
    }
    took = time.monotonic() - killed
    print(f"crop worker SIGKILLed: 20 jobs done {took:.1f} s after the kill")
    assert took < 150
    for name, job_id in submitted:
        assert bodies[job_id]["status"] == "succeeded"
        assert bodies[job_id]["result"] == expected[name]
        assert _job_objects(stack, job_id) == [
            f"jobs/{job_id}/neighbors.safetensors", f"jobs/{job_id}/result.json",
        ]  # fmt: skip


def test_stack_up_starts_again_a_worker_that_dies_while_it_waits(
    stack: dict[str, Any], client: httpx.Client, photo_dir: Path
) -> None:
    """A worker that `stack up` found running but that exits while `up` waits for the stack to
    answer (a worker SIGKILLed just before: it runs until the kernel has torn it down) is started
    again, and `up` succeeds; a worker `up` itself started that exits is still an error."""
    old = _current_pid(stack, "worker-retrieve")
    os.kill(old, signal.SIGSTOP)  # running, but it answers no ping: `up` waits for it
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    up = subprocess.Popen(
        [*PROCROP, "stack", "up"], env={**base, "PROCROP_HOME": str(stack["home"])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(8)  # `up` has found it running and waits for its ping
        os.killpg(old, signal.SIGKILL)
        _, err = up.communicate(timeout=180)
    finally:
        up.kill()
    assert up.returncode == 0, err
    assert "worker-retrieve exited while the stack came up; starting it again" in err
    assert _current_pid(stack, "worker-retrieve") != old
    done = _submit(client, sorted(photo_dir.glob("*.jpg"))[0], n=2, wait=60).json()
    assert done["status"] == "succeeded"
