"""The `procrop` command line (embedded mode: Milvus Lite file, local or S3 object store).

Settings come from `PROCROP_*` variables (shared/settings.py); a command fails only on the
settings it reads (an invalid one raises when it is first read), the services (`worker`,
`gateway`) check theirs before they start. Errors print one line, `procrop: error: ...`, on
stderr and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from tqdm import tqdm

from shared.errors import ProCropError, one_line
from shared.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("procrop")


def _fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"procrop: error: {message}", err=True)
    sys.exit(status)


def handle_errors(fn: F) -> F:
    """Turn `ProCropError`s, and any `OSError` a command did not expect (a file it cannot write),
    into one-line messages and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProCropError as exc:
            _fail(str(exc))
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or one_line(exc)}")
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume")

    return wrapper  # type: ignore[return-value]


def progress(total: int, unit: str) -> tqdm:
    """A progress bar on stderr when it is a terminal (none in pipes and logs, where it would be
    noise glued to the messages)."""
    return tqdm(
        total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=None
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details to stderr.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """ProCrop: aesthetic image cropping guided by professional compositions."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        ctx.obj = load_settings(only=())  # each command reads (and so checks) what it uses
    except ProCropError as exc:
        _fail(str(exc))


pass_settings = click.make_pass_decorator(Settings)


def _open(settings: Settings) -> tuple[Any, Any]:
    """The vector index and object store of `settings`, both checked reachable."""
    from shared.storage import build_object_store
    from shared.vector_index import open_index

    store = build_object_store(settings)
    store.check()
    return open_index(settings), store


@cli.command("index")
@click.argument("source")
@click.option("--collection", "-c", required=True, help="Collection to create or extend.")
@click.option(
    "--encoder",
    type=click.Choice(["effnet", "lite", "sam"]),
    default=None,
    help="Composition encoder [default: PROCROP_EMBEDDER__ENCODER, else effnet].",
)
@click.option(
    "--annotations",
    type=click.Path(exists=True, dir_okay=False),
    help="Crop annotations (FCDB format) to store with the photos.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096))
@pass_settings
@handle_errors
def index_cmd(
    settings: Settings, source: str, collection: str, encoder: str | None,
    annotations: str | None, batch_size: int,
) -> None:  # fmt: skip
    """Index the photos under SOURCE (a folder or s3://bucket/prefix) into a collection.

    Re-running is safe: photos already in the collection (same bytes) are skipped, so an
    interrupted run resumes where it stopped. Photos that cannot be read are listed on stderr
    and make the exit status 1; every other photo is indexed.
    """
    from services.embedder.registry import build_encoder
    from services.retriever.ingest import Ingestor
    from services.retriever.sources import list_photos
    from shared.annotations import load_fcdb
    from shared.storage.keys import check_collection_name

    check_collection_name(collection)
    photos = list_photos(source, settings)
    if not photos:
        raise ProCropError(f"{source}: no JPEG, PNG or WebP photos found")
    labels = load_fcdb(annotations) if annotations else None
    index, store = _open(settings)
    ingestor = Ingestor(
        collection, build_encoder(settings.embedder, encoder), index, store, labels,
        settings.max_image_pixels,
    )  # fmt: skip
    with progress(len(photos), "photo") as bar:
        report = ingestor.run(photos, batch_size, on_progress=bar.update)
    for uri, reason in report.failed:
        click.echo(f"procrop: skipped {uri}: {reason}", err=True)
    click.echo(
        f"{collection}: {report.added} added, {report.already_present} already present, "
        f"{report.duplicates} duplicates, {len(report.failed)} failed "
        f"({report.photos_per_second:.1f} photos/s)"
    )
    if report.failed:
        sys.exit(1)


def _retriever(settings: Settings, collection: str) -> Any:
    """A retriever for `collection`, with the encoder the collection was built by."""
    from services.embedder.registry import build_encoder
    from services.retriever.search import Retriever
    from shared.storage.keys import check_collection_name
    from shared.vector_index import open_index

    check_collection_name(collection)
    index = open_index(settings)
    family = str(index.metadata(collection).get("encoder", "lite")).split("-")[0]
    return Retriever(collection, build_encoder(settings.embedder, family), index)


@cli.command("search")
@click.argument("images", nargs=-1, required=True)
@click.option("--collection", "-c", required=True, help="Collection to search.")
@click.option(
    "-k",
    "k",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Neighbours per photo.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per photo on stdout.")
@pass_settings
@handle_errors
def search_cmd(
    settings: Settings, images: tuple[str, ...], collection: str, k: int, as_json: bool
) -> None:
    """Print the compositional neighbours of each IMAGE in a collection, best first.

    A photo that is itself in the collection is never its own neighbour. With --json each line is
    {"image", "neighbors": [{"id", "key", "score", "crop_norm"}]}; crop_norm is the neighbour's
    annotated crop, normalized xyxy in [0, 1] of its own photo, or null.
    """
    from services.retriever.search import Query
    from shared.errors import InvalidImageError
    from shared.images import content_hash, decode_image, read_bytes

    retriever = _retriever(settings, collection)
    failed = 0
    for path in images:
        try:
            data = read_bytes(path)
            image = decode_image(data, path, settings.max_image_pixels)
        except InvalidImageError as exc:
            click.echo(f"procrop: error: {exc}", err=True)
            failed += 1
            continue
        neighbors = retriever.search([Query(path, content_hash(data), image)], k)[0]
        click.echo(_format_neighbors(path, neighbors, as_json))
    if failed:
        sys.exit(1)


def _format_neighbors(path: str, neighbors: list[Any], as_json: bool) -> str:
    rows = [
        {"id": n.id, "key": n.source, "score": round(n.score, 6),
         "crop_norm": n.crops_norm[0] if n.crops_norm else None}
        for n in neighbors
    ]  # fmt: skip
    if as_json:
        return json.dumps({"image": path, "neighbors": rows})
    lines = [f"{path}:"] + [f"  {r['score']:.4f}  {r['key']}" for r in rows]
    return "\n".join(lines)


@cli.command("relations")
@click.argument("source")
@click.option("--collection", "-c", required=True, help="Collection to search.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="JSON file to write.",
)
@pass_settings
@handle_errors
def relations_cmd(settings: Settings, source: str, collection: str, k: int, out: str) -> None:
    """Precompute each SOURCE photo's top-K neighbours into one JSON file (for training)."""
    from services.retriever.relations import compute_relations, write_relations
    from services.retriever.sources import list_photos

    photos = list_photos(source, settings)
    if not photos:
        raise ProCropError(f"{source}: no JPEG, PNG or WebP photos found")
    retriever = _retriever(settings, collection)
    with progress(len(photos), "photo") as bar:
        relations = compute_relations(
            retriever, photos, k, settings.max_image_pixels, on_progress=bar.update
        )
    write_relations(relations, out)
    click.echo(f"{out}: top-{k} neighbours of {len(relations['photos'])} photos")


@cli.command("collections")
@pass_settings
@handle_errors
def collections_cmd(settings: Settings) -> None:
    """List the collections with their photo counts and encoders."""
    from shared.vector_index import open_index

    index = open_index(settings)
    for name in index.list_collections():
        meta = index.metadata(name)
        click.echo(f"{name}\t{index.count(name)}\t{meta.get('encoder')}")


@cli.command("sweep")
@click.option(
    "--grace", "grace_s", default=3600, show_default=True, type=click.FloatRange(0),
    help="Seconds an unreferenced object stays marked before it is deleted.",
)  # fmt: skip
@click.option(
    "--every", "every_s", type=click.FloatRange(60), default=None, metavar="SECONDS",
    help="Sweep again every SECONDS, until stopped (a sweeper service); a pass that fails "
    "(Redis or the store away) is logged and the next one tries again.",
)  # fmt: skip
@click.option(
    "--check", is_flag=True,
    help="Sweep nothing: exit 0 if Redis and the object store answer (a health check), else 1.",
)  # fmt: skip
@pass_settings
@handle_errors
def sweep_cmd(settings: Settings, grace_s: float, every_s: float | None, check: bool) -> None:
    """Delete job outputs and uploads whose job and upload records expired (run it hourly)."""
    import redis

    from shared.retention import sweep
    from shared.storage import build_object_store

    client = redis.Redis.from_url(settings.queue.redis_url, socket_connect_timeout=5)
    store = build_object_store(settings)

    def once() -> None:
        try:
            if check:
                client.ping()
                store.check()
                return
            report = sweep(store, client, grace_s=grace_s)
        except redis.RedisError as exc:
            raise ProCropError(f"Redis: {one_line(exc)}") from exc
        click.echo(json.dumps({"deleted": report.deleted, "marked": report.marked}))

    if every_s is None or check:
        once()
        return
    while True:
        try:
            once()
        except ProCropError as exc:  # the next pass tries again; marks live in Redis
            log.warning("sweep failed, next in %.0f s: %s", every_s, exc)
        sys.stdout.flush()
        time.sleep(every_s)


@cli.command("crop")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-n", "--n", "n", default=5, show_default=True, help="Crops per photo (per ratio).")
@click.option(
    "--aspect-ratio", "-a", "aspect_ratios", multiple=True, metavar="W:H",
    help="Also give the best crops at exactly this ratio (repeatable), e.g. 16:9, 1.91:1.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON line per photo on stdout.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path),
    help="Write the crops (STEM.cropN.jpg) and an overlay (STEM.overlay.png) here.",
)  # fmt: skip
@click.option(
    "--profile", type=click.Choice(["lite", "paper"]), default=None,
    help="Model profile [default: PROCROP_PROFILE, else lite].",
)  # fmt: skip
@click.option("--model", help="Checkpoint or bundle folder, or s3:// prefix [default: shipped].")
@click.option("--collection", help="Composition index to retrieve from [default: the bundle's].")
@pass_settings
@handle_errors
def crop_cmd(
    settings: Settings, images: tuple[str, ...], n: int, aspect_ratios: tuple[str, ...],
    as_json: bool, out: Path | None, profile: str | None, model: str | None, collection: str | None,
) -> None:  # fmt: skip
    """Propose the best crops of each IMAGE (JPEG, PNG or WebP), best first.

    Boxes are pixel x1 y1 x2 y2 in the original photo, with an aesthetic score in (0, 1).
    Near-duplicate crops are suppressed, so the N crops differ visibly; after the best-scored
    one come the alternatives that best cover the crops chosen for the nearest compositions.
    With --aspect-ratio, each crop has exactly that ratio: the model's proposals adjusted as
    little as possible.
    """
    from procrop.cropping import run_crop
    from services.cropper.postprocess import CropRequest
    from services.cropper.predictor import build_predictor

    try:
        request = CropRequest.parse(n, aspect_ratios)
    except ValueError as exc:
        _fail(str(exc), status=2)  # a usage error, in one line
    if out is not None:
        _distinct_stems(images)
        _writable_folder(out)  # before the model loads, not after the first photo
    predictor = build_predictor(settings, profile or settings.profile, model, collection)
    with progress(len(images), "photo") as bar:
        failed = run_crop(
            predictor, images, request, as_json, out, settings.max_image_pixels, bar.update
        )
    if failed:
        sys.exit(1)


def _distinct_stems(images: Sequence[str]) -> None:
    """A usage error unless every photo has its own STEM for --out's STEM.cropN.jpg files (the
    last of two photos named x.jpg and x.png silently overwrote the other's)."""
    first: dict[str, str] = {}
    for image in images:
        stem = Path(image).stem
        if stem in first and first[stem] != image:
            _fail(f"{first[stem]} and {image} would write the same files in --out", status=2)
        first.setdefault(stem, image)


def _writable_folder(folder: Path) -> None:
    """Create `folder` if missing; ProCropError unless files can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ProCropError(f"--out {folder}: cannot write there ({exc.strerror or exc})") from None


@cli.command("train")
@click.option(
    "--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False)
)
@click.option("--out", help="Override [train] out: a folder or s3://bucket/prefix.")
@click.option("--epochs", type=click.IntRange(1), help="Override [train] epochs.")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), help="Time budget.")
@pass_settings
@handle_errors
def train_cmd(
    settings: Settings,
    config_path: str,
    out: str | None,
    epochs: int | None,
    max_minutes: float | None,
) -> None:
    """Train a crop model as the TOML config says (see configs/lite.toml).

    Builds the composition index of the training photos and their relations when missing,
    evaluates on the fixed validation split after every epoch, and writes OUT/last and OUT/best
    checkpoints (safetensors + config.json). Running the same command again resumes from
    OUT/last. Under torchrun, training is data-parallel over the GPUs.
    """
    import dataclasses

    from services.cropper.train import load_train_config, train

    config = load_train_config(config_path)
    overrides: dict[str, Any] = {"out": out, "epochs": epochs, "max_minutes": max_minutes}
    config = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, **{k: v for k, v in overrides.items() if v})
    )
    logging.getLogger("services.cropper").setLevel(logging.INFO)
    bar = progress(config.optim.epochs, "epoch")

    def on_epoch(record: dict[str, Any]) -> None:
        bar.n = record["epoch"]
        val = record.get("val", {})
        bar.set_postfix(
            loss=f"{record['train'].get('loss', 0):.3f}", val_iou=f"{val.get('iou', 0):.4f}"
        )
        click.echo(json.dumps(record), err=True)

    with bar:
        record = train(config, settings, on_epoch=on_epoch)
    click.echo(json.dumps({"out": config.optim.out, **record}))


@cli.command("eval")
@click.option(
    "--annotations", required=True, type=click.Path(exists=True), help="Annotation file or folder."
)
@click.option(
    "--format", "fmt", type=click.Choice(["auto", "fcdb", "gaicd", "jsonl"]), default="auto",
    show_default=True,
)  # fmt: skip
@click.option(
    "--images", type=click.Path(exists=True, file_okay=False),
    help="Image root [default: the annotation file's folder, or the GAICD folder].",
)  # fmt: skip
@click.option(
    "--split", type=click.Choice(["val", "all"]), default="val", show_default=True,
    help="val: the fixed validation split (200 photos, seed 2026) the trainer holds out.",
)  # fmt: skip
@click.option("--baselines", is_flag=True, help="Also score whole photo, centre 90%, kNN transfer.")
@click.option("--profile", type=click.Choice(["lite", "paper"]), default=None)
@click.option("--model", help="Checkpoint or bundle [default: shipped lite model].")
@click.option("--collection", help="Composition index to retrieve from [default: the bundle's].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_settings
@handle_errors
def eval_cmd(
    settings: Settings, annotations: str, fmt: str, images: str | None, split: str, baselines: bool,
    profile: str | None, model: str | None, collection: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Score the crop model on annotated photos: IoU, Disp, acc (and Acc_K/N for GAICD)."""
    from procrop.evaluation import evaluate, format_table
    from services.cropper.predictor import build_predictor
    from shared.annotations import fixed_split, load_annotations

    default_root = Path(annotations).parent if Path(annotations).is_file() else Path(annotations)
    root = Path(images) if images else default_root
    labels = load_annotations(annotations, fmt, image_root=root)
    names = fixed_split(sorted(labels))[1] if split == "val" else sorted(labels)
    predictor = build_predictor(settings, profile or settings.profile, model, collection)
    with progress(len(names), "photo") as bar:
        report = evaluate(
            predictor, labels, root, names, baselines, bar.update, settings.max_image_pixels
        )
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))


@cli.command("bundle")
@click.argument("checkpoint")
@click.option("--collection", "-c", required=True, help="Collection holding the training photos.")
@click.option("--relations", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@pass_settings
@handle_errors
def bundle_cmd(
    settings: Settings, checkpoint: str, collection: str, relations: str, out: Path
) -> None:
    """Package CHECKPOINT with the composition index of its training photos (a model bundle).

    The photos are those of the relations file that are in COLLECTION (the training photos).
    """
    from services.cropper.checkpoint import load_checkpoint, open_location, save_checkpoint
    from services.cropper.runtime import (
        INT8_FILE,
        INT8_TOLERANCE,
        ONNX_FILE,
        example_arrays,
        export_onnx,
        optimize_onnx,
        quantize_onnx,
    )
    from services.retriever.bundle_index import export_index
    from services.retriever.relations import read_relations
    from services.retriever.token_store import TokenStore
    from shared.storage import LocalObjectStore

    model, info = load_checkpoint(*open_location(checkpoint, settings))
    index, store = _open(settings)
    photos = read_relations(relations)["photos"]
    hashes = {entry["content_hash"]: name for name, entry in photos.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(LocalObjectStore(out), "", model, info=info)
    example = example_arrays(model.config)
    error = export_onnx(model, out / ONNX_FILE, example)
    if error > 1e-3:
        raise ProCropError(f"the ONNX export differs from torch by {error:.2e}; not bundling it")
    error = quantize_onnx(out / ONNX_FILE, out / INT8_FILE, example)  # from the plain graph
    if error > INT8_TOLERANCE:
        (out / INT8_FILE).unlink()
        click.echo(f"the int8 graph moves boxes by {error:.3f}; bundled the float graph only")
    if optimize_onnx(out / ONNX_FILE, example) > 1e-4:
        raise ProCropError("ONNX Runtime's optimized graph differs from the exported one")
    count = export_index(index, TokenStore(store, collection), collection, hashes, out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    click.echo(f"{out}: model + index of {count} photos ({size:.1f} MB)")


@cli.command("cad")
@click.argument("source")
@click.option(
    "--out",
    help="Folder or s3://bucket/prefix for the run's files (with --gateway: a folder "
    "for its manifest and status; the files stay in the gateway's bucket).",
)
@click.option(
    "--variants", default=3, show_default=True, type=click.IntRange(1), help="Canvases per photo."
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--limit", type=click.IntRange(1), help="Use the first N photos (by name).")
@click.option(
    "--gateway", "gateway_url", help="Submit the run to a gateway (URL) instead of running it here."
)
@click.option("--run", "run_name", default=None, help="Run id on the gateway (resubmit to resume).")
@pass_settings
@handle_errors
def cad_cmd(
    settings: Settings,
    source: str,
    out: str | None,
    variants: int,
    seed: int,
    limit: int | None,
    gateway_url: str | None,
    run_name: str | None,
) -> None:
    """Generate a CAD dataset from the professional photos in SOURCE (folder or s3:// prefix).

    Each photo gives VARIANTS items: the photo down-scaled onto a larger canvas, its border
    out-painted (PROCROP_CAD__OUTPAINTER: lite = OpenCV, controlnet = SD-1.5 + ControlNet),
    checked by the quality filter; the placed region is the item's first crop label. OUT gets
    run.json, items/, manifest.jsonl, labels.jsonl (train with `procrop train`) and report.json.
    Running the same command again resumes: finished items are not made again.
    """
    from services.outpainter.run import RunParams

    params = RunParams(
        source=source, variants=variants, seed=seed, limit=limit, profile=settings.profile
    )
    if gateway_url:
        from procrop.remote import submit_dataset

        report = submit_dataset(gateway_url, params, run_name, out)
    elif out is None:
        raise click.UsageError("give --out (or --gateway URL)")
    else:
        report = _cad_embedded(settings, params, out)
    click.echo(json.dumps(report, indent=1))


def _cad_embedded(settings: Settings, params: Any, out: str) -> dict[str, Any]:
    from services.outpainter.pipeline import build_pipeline
    from services.outpainter.run import run_embedded
    from shared.checkpoints import open_location

    store, prefix = open_location(out, settings, create=True)
    prefix = f"{prefix}/" if prefix else ""
    params.check(settings)
    with progress(0, "item") as bar:

        def tick(line: dict[str, Any]) -> None:
            bar.update()
            bar.set_postfix_str(line["status"], refresh=False)

        def start(total: int) -> None:
            bar.reset(total=total)

        pipeline = build_pipeline(settings)
        return run_embedded(params, pipeline, store, settings, prefix, on_item=tick, on_start=start)


@cli.command("demo")
@pass_settings
@handle_errors
def demo_cmd(settings: Settings) -> None:
    """Crop real sample photos (shipped with scikit-image) and write their overlays."""
    from procrop.demo import run_demo

    run_demo(settings)


# --- services -----------------------------------------------------------------------------------

WORKERS = {
    "embed": "services.embedder.worker",
    "retrieve": "services.retriever.worker",
    "index": "services.retriever.worker",
    "crop": "services.cropper.worker",
    "outpaint": "services.outpainter.worker",
}
# The settings every worker reads (checked before it starts); the outpaint worker adds "cad".
WORKER_SETTINGS = ("home", "profile", "max_image_pixels", "log_level", "storage", "milvus",
                   "embedder", "crop", "queue", "cad")  # fmt: skip


@cli.command("worker")
@click.argument("queue", type=click.Choice(sorted(WORKERS)))
@click.option("--check", is_flag=True, help="Exit 0 if this host's worker of QUEUE answers a ping.")
@pass_settings
@handle_errors
def worker_cmd(settings: Settings, queue: str, check: bool) -> None:
    """Run the Celery worker of QUEUE (PROCROP_QUEUE__CONCURRENCY processes; Redis at
    PROCROP_QUEUE__REDIS_URL). Models load once per process, on the GPU when there is one."""
    import importlib

    from shared.worker import ping_worker

    settings.check(*WORKER_SETTINGS)
    if check:
        sys.exit(0 if ping_worker(queue) else 1)
    module = importlib.import_module(WORKERS[queue])
    if queue in ("retrieve", "index"):
        module.main(queue)
    else:
        module.main()


@cli.command("gateway")
@handle_errors
def gateway_cmd() -> None:
    """Serve the HTTP gateway on PROCROP_GATEWAY__HOST:PORT (needs PROCROP_API_KEYS)."""
    from services.gateway.app import main as serve

    serve()


@cli.group("stack")
def stack_group() -> None:
    """The local stack: Redis, S3, Milvus, workers and gateway on loopback (state in
    $PROCROP_HOME/stack)."""


@stack_group.command("up")
@pass_settings
@handle_errors
def stack_up(settings: Settings) -> None:
    """Start the stack (or what of it stopped) and wait until it is ready. The last line on
    stdout is JSON: gateway URL, API key, endpoints, pids."""
    from procrop.stack import Stack

    click.echo("procrop: starting the local stack...", err=True)
    summary = Stack(settings).up()
    click.echo(f"procrop: ready; gateway at {summary['gateway']}", err=True)
    click.echo(json.dumps(summary))


@stack_group.command("down")
@pass_settings
@handle_errors
def stack_down(settings: Settings) -> None:
    """Stop every process the stack started (by pid) and nothing else."""
    from procrop.stack import Stack

    stopped = Stack(settings).down()
    click.echo(
        f"procrop: stopped {', '.join(stopped) if stopped else 'nothing (no stack running)'}"
    )


@stack_group.command("status")
@pass_settings
@handle_errors
def stack_status(settings: Settings) -> None:
    """The stack's processes (alive or not) and endpoints, as JSON; exit 1 unless all run."""
    from procrop.stack import Stack

    status = Stack(settings).status()
    click.echo(json.dumps(status, indent=2))
    sys.exit(0 if status["running"] else 1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
