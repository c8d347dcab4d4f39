"""The `procrop` CLI as users run it: output formats, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from procrop.cli import cli
from procrop.servers import free_port
from shared.vector_index import open_index


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_index_search_json(settings, photo_dir):
    code, out, _ = run("index", str(photo_dir), "-c", "pro")
    assert code == 0 and "6 added" in out
    code, out, _ = run("index", str(photo_dir), "-c", "pro")
    assert code == 0 and "0 added, 6 already present" in out
    images = [str(photo_dir / "chelsea.jpg"), str(photo_dir / "rocket.jpg")]
    code, out, _ = run("search", *images, "-c", "pro", "-k", "3", "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == images
    for line, image in zip(lines, images, strict=True):
        assert len(line["neighbors"]) == 3
        assert image not in {n["key"] for n in line["neighbors"]}
        assert set(line["neighbors"][0]) == {"id", "key", "score", "crop_norm"}


def test_annotations_flow_into_search(settings, photo_dir, tmp_path):
    records = [
        {"image": p.name, "width": 256, "height": 256, "crop_xywh": [10, 20, 100, 120]}
        for p in photo_dir.glob("*.jpg")
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    assert run("index", str(photo_dir), "-c", "pro", "--annotations", str(ann))[0] == 0
    _, out, _ = run("search", str(photo_dir / "coins.jpg"), "-c", "pro", "-k", "2", "--json")
    crop = json.loads(out)["neighbors"][0]["crop_norm"]
    assert crop == pytest.approx([10 / 256, 20 / 256, 110 / 256, 140 / 256], abs=1e-5)


def test_relations_command(settings, photo_dir, tmp_path):
    run("index", str(photo_dir), "-c", "pro")
    out_file = tmp_path / "rel.json"
    code, _, _ = run("relations", str(photo_dir), "-c", "pro", "-k", "2", "--out", str(out_file))
    assert code == 0 and len(json.loads(out_file.read_text())["photos"]) == 6


def test_bad_photos_in_search_exit_nonzero(settings, photo_dir, tmp_path):
    run("index", str(photo_dir), "-c", "pro")
    (tmp_path / "zero.jpg").write_bytes(b"")
    good = str(photo_dir / "coins.jpg")
    code, out, err = run("search", str(tmp_path / "zero.jpg"), good, "-c", "pro", "--json")
    assert code == 1
    assert "zero.jpg: empty file" in err and len(err.strip().splitlines()) == 1
    assert json.loads(out)["image"] == good  # the good photo is still answered


def test_bad_photo_in_index_exit_nonzero_rest_indexed(settings, photo_copy):
    (photo_copy / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    code, out, err = run("index", str(photo_copy), "-c", "pro")
    assert code == 1 and "broken.jpg" in err and "6 added" in out and "1 failed" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("search", "x.jpg", "-c", "nope"), "no collection 'nope'"),
        (("search", "x.jpg", "-c", "bad-name!"), "invalid collection name"),
        (("index", "/no/such/folder", "-c", "pro"), "no such folder"),
        (("search", "x.jpg", "-c", "pro", "-k", "0"), "Invalid value for '-k'"),
    ],
)
def test_usage_errors(settings, args, message):
    code, _, err = run(*args)
    assert code in (1, 2) and message in err


def test_unreachable_s3_leaves_no_collection(settings, photo_dir, monkeypatch):
    monkeypatch.setenv("PROCROP_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("PROCROP_STORAGE__ENDPOINT", f"127.0.0.1:{free_port()}")
    code, _, err = run("index", str(photo_dir), "-c", "pro")
    assert code == 1 and "cannot reach S3 at 127.0.0.1" in err
    assert len(err.strip().splitlines()) == 1
    assert not open_index(settings).has_collection("pro")


def test_wrong_s3_credentials(s3_settings, photo_dir, monkeypatch):
    monkeypatch.setenv("PROCROP_STORAGE__SECRET_KEY", "wrong-secret")
    code, _, err = run("index", str(photo_dir), "-c", "pro")
    assert code == 1 and "refused the credentials" in err
    assert not open_index(s3_settings).has_collection("pro")


def test_unreachable_milvus(settings, photo_dir, monkeypatch):
    monkeypatch.setenv("PROCROP_MILVUS__URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PROCROP_MILVUS__TIMEOUT_S", "3")
    code, _, err = run("index", str(photo_dir), "-c", "pro")
    assert code == 1 and "Milvus at http://127.0.0.1" in err


def test_invalid_setting_names_the_variable(settings, photo_dir, monkeypatch):
    monkeypatch.setenv("PROCROP_STORAGE__BACKEND", "ftp")  # `index` writes tokens to the store
    code, _, err = run("index", str(photo_dir), "-c", "pro")
    assert code == 1 and "PROCROP_STORAGE__BACKEND" in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROCROP_API_KEYS", "short"),
        ("PROCROP_QUEUE__REDIS_URL", "http://not-redis"),
        ("PROCROP_QUEUE__SOFT_TIME_LIMIT_S", "99999"),  # past the hard limit
        ("PROCROP_GATEWAY__PORT", "0"),
        ("PROCROP_STORAGE__ENDPOINT", "http://x:9000/bucket"),
        ("PROCROP_MILVUS__TIMEOUT_S", "0"),
    ],
)
def test_offline_crop_ignores_settings_it_never_reads(
    settings, photo_dir, monkeypatch, variable, value
):
    monkeypatch.setenv(variable, value)
    code, out, err = run("crop", str(photo_dir / "coins.jpg"), "--json", "-n", "2")
    assert code == 0, err
    assert len(json.loads(out)["crops"]) == 2


@pytest.mark.parametrize(
    ("args", "variable", "value"),
    [
        (("worker", "embed"), "PROCROP_QUEUE__REDIS_URL", "http://not-redis"),
        (("worker", "crop"), "PROCROP_STORAGE__ENDPOINT", "x:9000/bucket"),
        (("worker", "index", "--check"), "PROCROP_MILVUS__TIMEOUT_S", "0"),
        (("gateway",), "PROCROP_GATEWAY__PORT", "0"),
        (("gateway",), "PROCROP_API_KEYS", "short"),
        (("crop", "x.jpg", "--profile", "paper"), "PROCROP_CROP__BATCH_SIZE", "0"),
    ],
)
def test_services_fail_fast_on_their_own_settings(settings, monkeypatch, args, variable, value):
    from shared.settings import get_settings

    monkeypatch.setenv("PROCROP_API_KEYS", "a-valid-key-0123456789")
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()  # the gateway reads the process-wide settings
    try:
        code, _, err = run(*args)
    finally:
        get_settings.cache_clear()
    assert code == 1
    assert variable in _one_error_line(err)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.lstrip().startswith(("0%", "100%"))]
    assert len(lines) == 1 and lines[0].startswith("procrop: error: "), err
    return lines[0]


@pytest.mark.parametrize("ratio", ["100000:1", "1:11", "100000000000000000:1", "1e17:1"])
def test_crop_refuses_extreme_ratios_in_one_line(settings, photo_dir, ratio):
    code, out, err = run("crop", str(photo_dir / "coins.jpg"), "-a", ratio)
    assert code == 2 and out == ""
    assert ratio in _one_error_line(err)


def test_crop_out_folder_that_cannot_be_written(settings, photo_dir):
    result = CliRunner().invoke(cli, ["crop", str(photo_dir / "coins.jpg"), "--out", "/proc/nope"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "/proc/nope" in _one_error_line(result.stderr)


def test_installed_entry_point(settings, photo_dir):
    """The real console script, in a real process, as `make demo` users run it: the shipped model."""
    exe = Path(sys.executable).parent / "procrop"
    env = {**os.environ, "PROCROP_HOME": str(settings.home)}
    done = subprocess.run([str(exe), "demo"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = settings.home / "demo" / "out"
    assert f"crops and overlays (STEM.overlay.png) in {out}" in done.stdout
    for stem in ("chelsea", "coffee", "motorcycle_left", "rocket"):
        assert (out / f"{stem}.overlay.png").is_file()
        assert 1 <= len(list(out.glob(f"{stem}.crop*.jpg"))) <= 3  # n = 3: at most 3 diverse crops
