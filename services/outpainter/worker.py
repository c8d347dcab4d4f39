"""CAD runs on the workers: a planner, and one task chain per item (photo, variant).

    procrop worker outpaint     # the fill stage (out-paint + filter), GPU
    (the describe stage runs on the embed workers, the planner on the index workers)

A run is a job of kind `dataset` (POST /v1/datasets) whose objects go under `datasets/{job}/`.
The planner (`procrop.index.cad_plan`) lists the source a page at a time, after its cursor, and
sends just enough item chains to keep `PROCROP_CAD__MAX_IN_FLIGHT` items in flight; every
finished item sends the planner again, so a run of a million photos never holds more than that
many messages in Redis. Passes of the planner are serialized by a lock in Redis; a pass asked for
while another runs is done by the holder (`shared.runs.RunState.try_lock`). The lock is named by
the planner task's id, so a pass that died holding it (with Redis, or with its worker) takes it
back when its message is delivered again. A run stalled by lost messages gets a pass with
`recover=True` from the gateway (`shared/recovery.py`): it sends again the items no message holds.

Each item is `procrop.embed.cad_describe` -> `procrop.outpaint.cad_fill`. Both are idempotent:
their objects derive from (run, photo hash, variant, seed), an item whose item.json exists is
read back instead of made again, and its slot is counted once in `shared.runs` whatever the
number of deliveries. A bad photo fails its item (recorded in the manifest), never the run.
Once the source is listed and no item is in flight, the pass that sees it writes the manifest,
labels and report and the job succeeds; after a cancel (DELETE), items not yet started finish as
`cancelled` and the manifest is written the same way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from celery import Task, chain
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from services.outpainter.pipeline import (
    Pipeline,
    build_pipeline,
    item_id,
    item_key,
    item_record,
    read_described,
    read_photo,
    write_filled,
)
from services.outpainter.pipeline import describe_item as write_description
from services.outpainter.run import RunParams, finalize, manifest_line, run_document
from services.retriever.sources import photo_page, photo_refs
from shared import worker_metrics
from shared.errors import ObjectNotFoundError, ProCropError, one_line
from shared.jobs import Job
from shared.queue import CAD_DESCRIBE, CAD_FILL, CAD_PLAN, queue_of, worker_app
from shared.recovery import orphaned_slots
from shared.runs import RunState, slot_id
from shared.settings import get_settings
from shared.worker import (
    BAD_INPUT,
    TRANSIENT,
    jobs,
    object_store,
    retry_later,
    run_worker,
    this_worker,
)

log = logging.getLogger(__name__)
app = worker_app()
LOCK_TTL_S = 120  # a planner pass that dies holding the lock is replaced after this long
PROFILE_OUTPAINTER = {"lite": "lite", "paper": "controlnet"}


@functools.cache
def pipeline() -> Pipeline:
    return build_pipeline(get_settings())


def run_state(job_id: str) -> RunState:
    return RunState(jobs().redis, job_id, get_settings().queue.job_ttl_s)


def run_prefix(job_id: str) -> str:
    return f"datasets/{job_id}/"


def params_of(job: Job) -> RunParams:
    p = job.params
    return RunParams(
        p["source"], p["variants"], p["seed"], p.get("limit"), p.get("profile", "lite")
    )


def wake(job_id: str) -> None:
    """Ask the planner for a pass (an item finished: room for another, or the run is done)."""
    app.signature(CAD_PLAN, args=(job_id,)).apply_async(retry=True)


# --- the planner ---------------------------------------------------------------------------------


# max_retries=None: a planner pass retries for as long as Redis or S3 is away (Celery: 3).
@app.task(name=CAD_PLAN, bind=True, max_retries=None)
def cad_plan(task: Task, job_id: str, redrive: bool = False, recover: bool = False) -> None:
    try:
        plan(job_id, redrive, recover, token=task.request.id)
    except TRANSIENT:
        retry_later(task, min(30, 2**task.request.retries), None)
    except BAD_INPUT as exc:  # the source is unreadable: nothing can run
        jobs().fail(job_id, one_line(exc))


def plan(
    job_id: str, redrive: bool = False, recover: bool = False, token: str | None = None
) -> None:
    """One or more planner passes, under the run's lock (see the module docstring). `token`
    (the task's id) names the holder: the same task delivered again takes the lock back.
    `redrive` sends every unfinished item again, `recover` those no message holds."""
    state = run_state(job_id)
    token = token or secrets.token_hex(8)
    if not state.try_lock(token, LOCK_TTL_S):
        return  # the holder makes the pass we asked for
    try:
        again = True
        while again:
            _pass(job_id, state, redrive, recover)
            redrive = recover = False
            again = state.unlock(token, LOCK_TTL_S)
    except BaseException:
        state.redis.delete(state.lock_key)
        raise


def _pass(job_id: str, state: RunState, redrive: bool, recover: bool) -> None:
    job = jobs().get(job_id)
    if job.status in ("succeeded", "failed"):
        return
    params, settings = params_of(job), get_settings()
    if job.status == "queued":
        _start(job, params)
        job = jobs().get(job_id)  # running now, or it ended (cancelled) while queued
    counts = state.read_counts()
    if redrive:  # resubmitted: send again what may have been lost with a dead broker
        _send(job_id, params, state.queued_slots(), True)
    elif recover:  # stalled (shared/recovery.py): send again the items whose message was lost
        orphans = orphaned_slots(state)
        if orphans:
            log.warning("run %s: %d items no message held (lost with Redis or a worker); sent again",
                        job_id, len(orphans))  # fmt: skip
        _send(job_id, params, orphans, True)
    if job.status != "cancelled" and not counts.exhausted:
        window = max(1, settings.cad.max_in_flight // params.variants)  # photos in flight
        photos = (settings.cad.max_in_flight - counts.in_flight) // params.variants
        if counts.in_flight == 0:  # a photo with more variants than the window still runs
            photos = max(photos, 1)
        if params.limit is not None:
            photos = min(photos, params.limit - counts.planned // params.variants)
        # Refill in batches of a quarter of the window (not one listing per finished item), or
        # whatever is left when the limit is near.
        left = None if params.limit is None else params.limit - counts.planned // params.variants
        if photos > 0 and (photos >= max(1, window // 4) or photos == left):
            refs, exhausted = photo_page(params.source, settings, state.cursor(), photos)
            job = jobs().get(job_id)  # a cancel that landed while the source was listed
            if job.status == "cancelled":
                refs = []
            planned = counts.planned // params.variants + len(refs)
            exhausted = exhausted or (params.limit is not None and planned >= params.limit)
            entries = [
                (slot_id(ref.name, v), {"photo": ref.name, "variant": v})
                for ref in refs
                for v in range(params.variants)
            ]
            pending = state.plan(entries) if entries else []
            _send(job_id, params, pending, "run" in job.params or redrive)
            state.advance(refs[-1].name if refs else state.cursor(), exhausted)
        counts = state.read_counts()
    if counts.in_flight == 0 and (counts.exhausted or job.status == "cancelled"):
        report = finalize(object_store(), run_prefix(job_id), state.manifest())
        state.mark_finalized()
        key = f"{run_prefix(job_id)}report.json"
        if job.status != "cancelled":
            jobs().succeed(job_id, key)
        log.info("run %s: %s", job_id, report)


def _start(job: Job, params: RunParams) -> None:
    """Mark the run started and write its run.json (nothing if it ended before it started)."""
    if not jobs().start_stage(job.id, "plan", this_worker()):
        return
    store, key = object_store(), f"{run_prefix(job.id)}run.json"
    # No models here: the planner loads none; each item records the models that made it.
    document = run_document(job.id, params, get_settings().cad)
    store.put(key, json.dumps(document, indent=1, sort_keys=True).encode(), "application/json")


def _send(job_id: str, params: RunParams, slots: list[str], resumable: bool) -> None:
    """One task chain per slot (its photo and variant as recorded when it was planned).
    `resumable`: the run may hold items made before (a named run, or a re-drive), so each item
    looks for its record before it is made."""
    for slot, info in zip(slots, run_state(job_id).slot_infos(slots), strict=True):
        message = {
            "job_id": job_id, "slot": slot, "photo": info["photo"], "variant": info["variant"],
            "source": params.source, "seed": params.seed, "profile": params.profile,
            "resumable": resumable,
        }  # fmt: skip
        chain(app.signature(CAD_DESCRIBE, args=(message,)), app.signature(CAD_FILL)).apply_async(
            retry=True
        )


# --- one item ------------------------------------------------------------------------------------


def run_item(task: Task, message: dict[str, Any], stage: str, work: Callable[[], Any]) -> Any:
    """A stage of one item: skipped when the item or the run is over; a failure fails the item
    (transient ones are retried first), never the run."""
    job_id, slot = message["job_id"], message["slot"]
    state = run_state(job_id)
    try:
        proceed = jobs().start_stage(job_id, stage, this_worker())
        if not proceed:  # the run was cancelled (or is over): this item does not start
            _finish(state, message, "cancelled", None, ["cancelled by the client"])
            raise Ignore()
        if state.state(slot) != "queued":
            raise Ignore()  # finished in an earlier delivery
        started = time.perf_counter()
        out = work()
        worker_metrics.observe_stage(queue_of(task.name), stage, time.perf_counter() - started)
        return out
    except Ignore:
        raise
    except Exception as exc:
        return _failed(task, state, message, stage, exc)


def _failed(
    task: Task, state: RunState, message: dict[str, Any], stage: str, exc: BaseException
) -> Any:
    if isinstance(exc, TRANSIENT) and task.request.retries < get_settings().queue.max_retries:
        delay = min(get_settings().queue.retry_backoff_max_s, 2**task.request.retries)
        log.warning("item %s: %s failed (%s); retrying in %d s", message["slot"], stage, exc, delay)
        retry_later(task, delay, get_settings().queue.max_retries)
    worker_metrics.mark_outcome(task, "bad_input" if isinstance(exc, BAD_INPUT) else "error")
    if isinstance(exc, (ProCropError, *BAD_INPUT, *TRANSIENT)):
        reason = one_line(exc)
    elif isinstance(exc, SoftTimeLimitExceeded):
        reason = f"{stage} took longer than {get_settings().queue.soft_time_limit_s} s"
    else:
        log.error("item %s: %s failed", message["slot"], stage, exc_info=exc)
        reason = f"internal error in {stage}: {type(exc).__name__}"
    _finish(state, message, "failed", message.get("item"), [reason])
    raise Ignore() from None


def _finish(
    state: RunState, message: dict[str, Any], outcome: str, item: str | None, reasons: list[str]
) -> None:
    info = {
        "photo": message["photo"],
        "variant": message["variant"],
        "item": item,
        "reasons": reasons,
    }
    if state.finish(message["slot"], outcome, info, reasons if outcome == "rejected" else ()):
        wake(message["job_id"])


def _photo(message: dict[str, Any]) -> tuple[Any, str]:
    settings = get_settings()
    [ref] = photo_refs(message["source"], [message["photo"]], settings)
    return read_photo(ref.read(), ref.uri, settings)


def describe_item(message: dict[str, Any]) -> dict[str, Any]:
    """Stage 1: masks and description, or the end of the item (a duplicate, or already made)."""
    state, store, prefix = (
        run_state(message["job_id"]),
        object_store(),
        run_prefix(message["job_id"]),
    )
    image, sha = _photo(message)
    item = item_id(sha, message["variant"])
    owner = state.claim(item, message["slot"])
    if owner != message["slot"]:
        _finish(state, message, "duplicate", item, [f"same photo as slot {owner}"])
        raise Ignore()
    record = None
    if message.get("resumable", True):  # a new unnamed run has no items yet: skip the lookup
        with contextlib.suppress(ObjectNotFoundError):
            record = json.loads(store.get(item_key(prefix, item, "item.json")))
    if record is not None:  # made before (a resumed run): count it, do not make it again
        _finish(state, message, record["status"], item, record.get("reasons", []))
        raise Ignore()
    write_description(
        pipeline(), store, prefix, item, image, sha, message["variant"], message["seed"]
    )
    return {**message, "item": item, "sha256": sha}


def fill_item(message: dict[str, Any]) -> None:
    """Stage 2: out-paint, filter, write the item and count it."""
    settings, store = get_settings(), object_store()
    wanted = PROFILE_OUTPAINTER.get(message.get("profile", "lite"), "lite")
    if settings.cad.outpainter != wanted:
        raise ProCropError(
            f"this outpaint worker runs the {settings.cad.outpainter} out-painter; the run's "
            f"profile {message.get('profile')!r} needs {wanted} (PROCROP_CAD__OUTPAINTER)"
        )
    prefix, item = run_prefix(message["job_id"]), message["item"]
    image, sha = _photo(message)
    described = read_described(store, prefix, item, sha)
    filled = pipeline().fill(image, described, sha, message["variant"], message["seed"])
    record = item_record(item, message["photo"], sha, message["variant"], described, filled)
    record["outpainter"] = f"{pipeline().outpainter.name} {pipeline().outpainter.version}"
    write_filled(store, prefix, item, filled, record)
    _finish(run_state(message["job_id"]), message, record["status"], item, record["reasons"])


@app.task(name=CAD_DESCRIBE, bind=True)
def cad_describe(task: Task, message: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = run_item(task, message, "describe", lambda: describe_item(message))
    return result


@app.task(name=CAD_FILL, bind=True)
def cad_fill(task: Task, message: dict[str, Any]) -> None:
    run_item(task, message, "fill", lambda: fill_item(message))


def main() -> None:
    run_worker("outpaint")


__all__ = ["manifest_line"]
