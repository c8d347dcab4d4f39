"""`procrop demo`: index real sample photos that scikit-image ships, then show a photo's neighbours."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from services.embedder.registry import build_encoder
from services.retriever.ingest import Ingestor
from services.retriever.search import Query, Retriever
from services.retriever.sources import list_photos
from shared.images import content_hash, decode_image
from shared.settings import Settings
from shared.storage import build_object_store
from shared.vector_index import open_index

SAMPLES = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png",
    "retina.jpg", "rocket.jpg",
)  # fmt: skip
QUERY = "chelsea.png"
COLLECTION = "demo_samples"


def sample_folder(settings: Settings) -> Path:
    """Copy the sample photos into `$PROCROP_HOME/demo/photos` (once) and return that folder."""
    import skimage

    source = Path(skimage.__file__).parent / "data"
    folder = settings.home / "demo" / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        if not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)
    return folder


def run_demo(settings: Settings, k: int = 5) -> None:
    folder = sample_folder(settings)
    encoder = build_encoder(settings.embedder, "lite")
    index = open_index(settings)
    store = build_object_store(settings)
    report = Ingestor(COLLECTION, encoder, index, store).run(list_photos(str(folder), settings))
    click.echo(
        f"indexed {report.added} new sample photos ({report.already_present} already there) "
        f"into collection {COLLECTION!r} at {index.uri}"
    )
    query = folder / QUERY
    data = query.read_bytes()
    neighbors = Retriever(COLLECTION, encoder, index).search(
        [Query(QUERY, content_hash(data), decode_image(data, str(query)))], k
    )[0]
    click.echo(f"compositional neighbours of {query}:")
    for rank, n in enumerate(neighbors, 1):
        click.echo(f"  {rank}. {n.score:+.3f}  {Path(n.source).name}")
