"""The `procrop` command line (embedded mode: Milvus Lite file, local or S3 object store).

Settings come from `PROCROP_*` variables (shared/settings.py). Errors print one line,
`procrop: error: ...`, on stderr and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from tqdm import tqdm

from shared.errors import ProCropError
from shared.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("procrop")


def _fail(message: str) -> None:
    click.echo(f"procrop: error: {message}", err=True)
    sys.exit(1)


def handle_errors(fn: F) -> F:
    """Turn `ProCropError`s into one-line messages and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProCropError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; run the same command again to resume")

    return wrapper  # type: ignore[return-value]


def progress(total: int, unit: str) -> tqdm:
    """A progress bar on stderr."""
    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


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
        ctx.obj = load_settings()
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
    type=click.Choice(["lite", "sam"]),
    default=None,
    help="Composition encoder [default: PROCROP_EMBEDDER__ENCODER, else lite].",
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


@cli.command("demo")
@pass_settings
@handle_errors
def demo_cmd(settings: Settings) -> None:
    """Index sample photos shipped with scikit-image and show a photo's compositional neighbours."""
    from procrop.demo import run_demo

    run_demo(settings)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
