"""The CAD pipeline in one process: seeded canvases, the lite fill, the quality filter's reasons on
planted failures, and `procrop cad` (manifest once per item, labels `procrop train` reads, resume,
bad photos as failed lines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.outpainter.canvas import item_seed, place, plan_placement
from services.outpainter.lite import LiteOutpainter
from services.outpainter.quality import judge
from shared.annotations import load_jsonl
from shared.errors import InvalidImageError
from shared.settings import CadSettings

CAD = CadSettings()
CQ100 = Path(__file__).resolve().parents[4] / "shared" / "data" / "cq100"
PHOTOS = sorted(CQ100.glob("*.jpg"))[:8]
if not PHOTOS:  # the parametrized cases below are drawn from these photos at collection
    pytest.skip(f"cq100 photos not found in {CQ100}", allow_module_level=True)


def _photo(i: int = 0) -> Image.Image:
    return Image.open(PHOTOS[i]).convert("RGB")


def test_placements_are_seeded_inside_the_canvas_and_in_range() -> None:
    photo = _photo()
    seeds = [item_seed(7, "abc", v) for v in range(40)]
    assert len(set(seeds)) == 40 and seeds == [item_seed(7, "abc", v) for v in range(40)]
    for seed in seeds:
        p = plan_placement(photo.size, seed, CAD)
        assert p == plan_placement(photo.size, seed, CAD)
        assert (
            CAD.canvas_min
            <= min(p.canvas_w, p.canvas_h)
            <= max(p.canvas_w, p.canvas_h)
            <= CAD.canvas_max
        )
        x1, y1, x2, y2 = p.box
        assert 0 <= x1 < x2 <= p.canvas_w and 0 <= y1 < y2 <= p.canvas_h
        fit = min(p.canvas_w / photo.width, p.canvas_h / photo.height)
        assert (
            CAD.scale_min - 0.01
            <= max((x2 - x1) / (photo.width * fit), (y2 - y1) / (photo.height * fit))
            <= CAD.scale_max + 0.01
        )
        assert abs((x2 - x1) / (y2 - y1) - photo.width / photo.height) < 0.02  # aspect kept


def test_too_small_photos_are_refused() -> None:
    with pytest.raises(InvalidImageError, match="at least"):
        plan_placement((100, 400), 1, CAD)


def test_the_lite_fill_keeps_the_photo_exactly_and_is_seeded() -> None:
    photo = _photo(1)
    placement = plan_placement(photo.size, 3, CAD)
    canvas = place(photo, placement)
    painter = LiteOutpainter()
    [a], [b], [c] = (
        painter.outpaint([canvas], [""], [np.zeros((1, 1, 1))], [s]) for s in (5, 5, 6)
    )
    pixels = np.asarray(a)
    assert a.size == canvas.size
    assert np.array_equal(pixels[canvas.known], np.asarray(canvas.image)[canvas.known])
    assert np.array_equal(pixels, np.asarray(b)) and not np.array_equal(pixels, np.asarray(c))
    assert pixels[~canvas.known].std() > 5  # not left grey


def _fills() -> list[tuple[str, Image.Image, tuple[int, int, int, int], str | None]]:
    """(case, out-painted canvas, photo box, the reason it must be rejected for, or None)."""
    cases = []
    for i in range(4):
        photo = _photo(i)
        placement = plan_placement(photo.size, 11 + i, CAD)
        canvas = place(photo, placement)
        [good] = LiteOutpainter().outpaint([canvas], [""], [np.zeros((1, 1, 1))], [i])
        pixels = np.asarray(good).copy()
        tiles = np.tile(np.asarray(photo.resize((48, 48))), (30, 30, 1))[
            : pixels.shape[0], : pixels.shape[1]
        ]
        tiled = pixels.copy()
        tiled[~canvas.known] = tiles[~canvas.known]
        stepped = pixels.astype(int)
        stepped[~canvas.known] = np.clip(stepped[~canvas.known] + 80, 0, 255)
        cases += [
            ("grey", canvas.image, placement.box, "flat"),
            ("tiles", Image.fromarray(tiled), placement.box, "repeat"),
            ("step", Image.fromarray(stepped.astype(np.uint8)), placement.box, "colour"),
        ]
    return cases


@pytest.mark.parametrize(
    ("case", "image", "box", "reason"), _fills(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_planted_failures_are_rejected_for_their_reason(
    case: str, image: Image.Image, box: tuple[int, int, int, int], reason: str
) -> None:
    verdict = judge(image, box, CAD)
    assert not verdict.accepted and reason in verdict.reasons, (case, verdict)


def _cad(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    return subprocess.run(
        [sys.executable, "-m", "procrop", "cad", *args], env={**env, "PROCROP_HOME": str(home)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_procrop_cad_writes_every_item_once_resumes_and_reports_bad_photos(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    for path in PHOTOS[:4]:
        (source / path.name).write_bytes(path.read_bytes())
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (source / "copy.jpg").write_bytes(PHOTOS[0].read_bytes())  # byte-identical to another photo
    out = tmp_path / "run"
    done = _cad(
        str(source), "--out", str(out), "--variants", "2", "--seed", "4", home=tmp_path / "h"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted((line["photo"], line["variant"]) for line in lines) == sorted(
        (p.name, v) for p in [*PHOTOS[:4], Path("broken.jpg"), Path("copy.jpg")] for v in range(2)
    )
    status = {(line["photo"], line["variant"]): line["status"] for line in lines}
    assert status[("broken.jpg", 0)] == status[("broken.jpg", 1)] == "failed"
    assert {status[("copy.jpg", v)] for v in range(2)} == {"duplicate"} or {
        status[(PHOTOS[0].name, v)] for v in range(2)
    } == {"duplicate"}
    assert report["items"] == 12 and report["failed"] == 2 and report["duplicate"] == 2
    labels = load_jsonl(out / "labels.jsonl", out)
    assert len(labels) == report["accepted"] > 0
    for image, photo in labels.items():
        scene = json.loads((out / Path(image).parent / "scene.json").read_text())
        (w, h), (x1, y1, x2, y2) = scene["canvas"], scene["box"]
        assert photo.crops_norm[0] == pytest.approx((x1 / w, y1 / h, x2 / w, y2 / h), abs=1e-6)

    stamps = {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*")}
    again = _cad(
        str(source), "--out", str(out), "--variants", "2", "--seed", "4", home=tmp_path / "h"
    )
    assert again.returncode == 0 and json.loads(again.stdout) == report
    assert {p: p.stat().st_mtime_ns for p in (out / "items").rglob("*")} == stamps  # nothing redone

    other = _cad(
        str(source), "--out", str(out), "--variants", "2", "--seed", "5", home=tmp_path / "h"
    )
    assert other.returncode == 1 and "other parameters" in other.stderr
