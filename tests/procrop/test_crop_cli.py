"""`procrop train | bundle | crop | eval` as users run them, on a tiny model and real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from procrop.cli import cli
from procrop.servers import free_port
from services.cropper.checkpoint import read_config
from shared.storage import LocalObjectStore

TINY_MODEL = """
[model]
profile = "lite"
hidden_dim = 32
num_heads = 2
enc_layers = 1
dec_layers = 1
ffn_dim = 32
num_queries = 6
k = 3
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _annotations(photo_dir: Path, tmp_path: Path) -> Path:
    lines = []
    for path in sorted(photo_dir.glob("*.jpg")):
        w, h = Image.open(path).size
        box = [round(0.1 * w), round(0.15 * h), round(0.85 * w), round(0.9 * h)]
        lines.append(json.dumps({"image": path.name, "crops": [{"box": box}]}))
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    return ann


def _config(
    tmp_path: Path, photo_dir: Path, epochs: int, model: str = TINY_MODEL, train: str = ""
) -> Path:
    ann = _annotations(photo_dir, tmp_path)
    config = tmp_path / "train.toml"
    config.write_text(
        f'[data]\nannotations = "{ann}"\nimages = "{photo_dir}"\nsplit = "all"\n'
        f'collection = "six"\nrelations = "{tmp_path / "rel.json"}"\n{model}\n'
        f"[train]\nepochs = {epochs}\nbatch_size = 3\nlr = 1e-3\nlr_backbone = 1e-3\n"
        f'out = "{tmp_path / "run"}"\nwarmup_steps = 1\n{train}'
    )
    return config


@pytest.fixture(scope="module")
def trained_bundle(photo_dir, tmp_path_factory) -> Path:
    """A tiny model trained 2 epochs by `procrop train`, bundled by `procrop bundle` (once)."""
    tmp_path = tmp_path_factory.mktemp("bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROCROP_HOME", str(tmp_path / "home"))
        code, out, err = run("train", "--config", str(_config(tmp_path, photo_dir, 2)))
        assert code == 0, err
        assert json.loads(out.splitlines()[-1])["epoch"] == 2
        code, out, err = run(
            "bundle", str(tmp_path / "run" / "best"), "-c", "six",
            "--relations", str(tmp_path / "rel.json"), "--out", str(tmp_path / "bundle"),
        )  # fmt: skip
    assert code == 0, err
    assert "index of 6 photos" in out
    graphs = {p.name for p in (tmp_path / "bundle").glob("*.onnx")}
    assert graphs == {"model.onnx", "model.int8.onnx"}
    for graph in graphs:  # stored with ONNX Runtime's optimizations done (fused operators)
        domains = {n.domain for n in onnx.load(str(tmp_path / "bundle" / graph)).graph.node}
        assert "com.microsoft" in domains, graph
    return tmp_path / "bundle"


@pytest.fixture
def bundle(settings, trained_bundle, tmp_path) -> Path:
    """A private copy of the trained bundle (tests may break it), with a fresh PROCROP_HOME."""
    return Path(shutil.copytree(trained_bundle, tmp_path / "bundle"))


def test_train_resumes_from_last(settings, photo_dir, tmp_path):
    config = _config(tmp_path, photo_dir, 1)
    assert run("train", "--config", str(config))[0] == 0
    code, out, err = run("train", "--config", str(config), "--epochs", "2")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["epoch"] == 2  # one more epoch, not two
    assert err.count('{"epoch": ') == 1
    _, info = read_config(LocalObjectStore(tmp_path / "run" / "last"), "")
    assert info["epoch"] == 2


def test_crop_json_ranked_inside_photo(bundle, photo_dir):
    images = [str(photo_dir / "chelsea.jpg"), str(photo_dir / "rocket.jpg")]
    code, out, err = run("crop", *images, "--model", str(bundle), "--n", "3", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == images
    for line in lines:
        w, h = Image.open(line["image"]).size
        assert (line["width"], line["height"]) == (w, h)
        assert 1 <= len(line["crops"]) <= 3
        scores = [c["score"] for c in line["crops"]]
        assert scores[0] == max(scores)  # the best first; the alternatives in the order picked
        for crop in line["crops"]:
            x1, y1, x2, y2 = crop["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and crop["aspect_ratio"] is None


def test_crop_exact_aspect_ratios(bundle, photo_dir):
    image = str(photo_dir / "coffee.jpg")
    code, out, err = run(
        "crop", image, "--model", str(bundle), "-n", "2", "-a", "16:9", "-a", "1:1", "--json"
    )
    assert code == 0, err
    crops = json.loads(out)["crops"]
    assert {c["aspect_ratio"] for c in crops} == {"16:9", "1:1"}
    for crop in crops:
        x1, y1, x2, y2 = crop["box"]
        target = 16 / 9 if crop["aspect_ratio"] == "16:9" else 1.0
        assert abs((x2 - x1) / (y2 - y1) - target) <= 1.0 / (y2 - y1)  # exact up to a pixel


def test_crop_out_refuses_two_photos_of_one_stem(bundle, photo_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(photo_dir / "astronaut.jpg", a / "x.jpg")
    Image.open(photo_dir / "coins.jpg").save(b / "x.png")
    out_dir = tmp_path / "out"
    code, _, err = run("crop", str(a / "x.jpg"), str(b / "x.png"), "--out", str(out_dir))
    assert code == 2 and f"{a / 'x.jpg'} and {b / 'x.png'} would write the same files" in err
    assert not out_dir.exists()  # refused before anything ran
    code, _, err = run(
        "crop", str(a / "x.jpg"), str(a / "x.jpg"), "--model", str(bundle), "--out", str(out_dir)
    )
    assert code == 0, err  # one photo twice: the same files, written twice


def test_crop_out_writes_crops_and_overlay(bundle, photo_dir, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(
        "crop",
        str(photo_dir / "astronaut.jpg"),
        "--model",
        str(bundle),
        "-n",
        "2",
        "--out",
        str(out_dir),
    )
    assert code == 0, err
    overlay = Image.open(out_dir / "astronaut.overlay.png")
    assert overlay.size == Image.open(photo_dir / "astronaut.jpg").size
    crops = sorted(out_dir.glob("astronaut.crop*.jpg"))
    assert 1 <= len(crops) <= 2
    first = out.splitlines()[1].split()  # "1. SCORE x1 y1 x2 y2"
    x1, y1, x2, y2 = map(int, first[2:6])
    assert Image.open(crops[0]).size == (x2 - x1, y2 - y1)


def test_crop_never_retrieves_itself_and_same_as_batched(bundle, photo_dir):
    """Photos of the index are answered from their neighbours only; one-by-one == batched."""
    images = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    _, together, _ = run("crop", *images, "--model", str(bundle), "--json")
    alone = [run("crop", image, "--model", str(bundle), "--json")[1].strip() for image in images]
    assert together.strip().splitlines() == alone


def test_eval_reports_model_and_baselines(bundle, photo_dir, tmp_path):
    ann = _annotations(photo_dir, tmp_path)
    code, out, err = run(
        "eval", "--annotations", str(ann), "--images", str(photo_dir), "--split", "all",
        "--model", str(bundle), "--baselines", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"ProCrop", "whole photo", "centre 90%", "kNN-3 median"}
    # Every photo's crop is 75% x 75% of it, placed alike: kNN transfer recovers it exactly.
    assert report["kNN-3 median"]["iou"] == pytest.approx(1.0, abs=0.01)
    assert report["whole photo"]["iou"] == pytest.approx(0.75 * 0.75, abs=0.01)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-a", "16x9"), "aspect ratio must be 'W:H'"),
        (("-a", "0:1"), "aspect ratio"),
        (("--n", "0"), "n must be between 1"),
    ],
)
def test_bad_requests_are_usage_errors(bundle, photo_dir, args, message):
    code, _, err = run("crop", str(photo_dir / "coins.jpg"), "--model", str(bundle), *args)
    assert code == 2 and message in err


def test_missing_and_mismatched_checkpoints(settings, bundle, photo_dir, tmp_path):
    image = str(photo_dir / "coins.jpg")
    code, _, err = run("crop", image, "--model", str(tmp_path / "nothing" / "here"))
    assert code == 1 and "no crop model at" in err
    assert not (tmp_path / "nothing").exists()  # looking for a model creates no folders
    code, _, err = run("crop", image, "--model", "http://example.com/model")
    assert code == 1 and "give a folder or an s3://bucket/prefix location" in err
    assert not Path("http:").exists()
    config = json.loads((bundle / "config.json").read_text())
    config["model"]["num_queries"] += 1
    (bundle / "config.json").write_text(json.dumps(config))
    code, _, err = run("crop", image, "--model", str(bundle))
    assert code == 1 and "does not match the model config" in err


def test_bad_photo_skipped_others_answered(bundle, photo_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = str(photo_dir / "coins.jpg")
    code, out, err = run("crop", str(broken), good, "--model", str(bundle), "--json")
    assert code == 1
    # One line, and no progress bar glued to it: stderr is not a terminal here.
    [line] = err.splitlines()
    assert line.startswith(f"procrop: skipped {broken}: ")
    assert [json.loads(line)["image"] for line in out.splitlines()] == [good]


def test_paper_profile_refuses_lite_model(bundle, photo_dir):
    code, _, err = run(
        "crop", str(photo_dir / "coins.jpg"), "--model", str(bundle), "--profile", "paper"
    )
    assert code == 1 and "holds a 'lite' model, not 'paper'" in err


def test_onnx_and_torch_runtimes_agree(bundle, photo_dir, monkeypatch):
    monkeypatch.setenv("PROCROP_CROP__QUANTIZED", "false")  # the float graph: the same model
    images = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    _, onnx_out, _ = run("crop", *images, "--model", str(bundle), "--json")
    monkeypatch.setenv("PROCROP_CROP__RUNTIME", "torch")
    code, torch_out, err = run("crop", *images, "--model", str(bundle), "--json")
    assert code == 0, err
    for a, b in zip(onnx_out.splitlines(), torch_out.splitlines(), strict=True):
        crops_a, crops_b = json.loads(a)["crops"], json.loads(b)["crops"]
        assert [c["box"] for c in crops_a] == [c["box"] for c in crops_b]
        assert [c["score"] for c in crops_a] == pytest.approx(
            [c["score"] for c in crops_b], abs=1e-3
        )


def test_milvus_collection_gives_same_crops_as_bundle_index(bundle, photo_dir):
    """The bundle's in-memory index and the same index installed in Milvus Lite agree."""
    from services.retriever.bundle_index import install_bundle
    from shared.settings import load_settings
    from shared.storage import build_object_store
    from shared.vector_index import open_index

    settings = load_settings()
    index = open_index(settings)
    name = install_bundle(bundle, index, build_object_store(settings))
    assert install_bundle(bundle, index, build_object_store(settings)) == name  # once only
    index.close()
    images = sorted(str(p) for p in photo_dir.glob("*.jpg"))
    _, memory, _ = run("crop", *images, "--model", str(bundle), "--json")
    code, milvus, err = run("crop", *images, "--model", str(bundle), "--collection", name, "--json")
    assert code == 0, err
    assert memory == milvus


def test_train_under_torchrun_ddp(settings, photo_dir, tmp_path):
    """Two processes (gloo on CPU), as `torchrun` launches them on GPUs."""
    import os
    import subprocess
    import sys

    config = _config(tmp_path, photo_dir, 1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "--module", "procrop.cli", "train", "--config", str(config),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, info = read_config(LocalObjectStore(tmp_path / "run" / "last"), "")
    assert info["epoch"] == 1


def test_eval_gaicd_reports_acc_k_n(bundle, photo_dir, tmp_path):
    """Graded candidate crops (GAICD layout: `y1 x1 y2 x2 MOS` per line) give the Acc_K/N row."""
    folder = tmp_path / "gaicd"
    folder.mkdir()
    for path in sorted(photo_dir.glob("*.jpg")):
        w, h = Image.open(path).size
        lines = [
            f"{int(f * h)} {int(f * w)} {int((1 - f) * h)} {int((1 - f) * w)} {5 - 10 * f:.2f}"
            for f in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
        ]
        (folder / f"{path.stem}.txt").write_text("\n".join(lines) + "\n")
    code, out, err = run(
        "eval", "--annotations", str(folder), "--format", "gaicd", "--images", str(photo_dir),
        "--split", "all", "--model", str(bundle), "--json",
    )  # fmt: skip
    assert code == 0, err
    row = json.loads(out)["ProCrop"]
    for key in ("Acc1/5", "Acc4/5", "Acc_5", "Acc1/10", "Acc_10"):
        assert 0.0 <= row[key] <= 1.0
    assert row["Acc1/10"] >= row["Acc1/5"]  # every top-5 crop is also a top-10 crop


def test_lite_crop_path_never_imports_torch(bundle, photo_dir):
    """Start-up matters for the CLI: the ONNX path must not pull torch in (it costs seconds)."""
    import subprocess
    import sys

    code = (
        "import sys; from procrop.cli import cli\n"
        f"cli(['crop', {str(photo_dir / 'coins.jpg')!r}, '--model', {str(bundle)!r}, '--json'],"
        " standalone_mode=False)\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "torch imported: False"


TINY_EFFNET = TINY_MODEL.replace('profile = "lite"', 'profile = "lite-effnet"')


def test_effnet_model_trains_on_encoded_views_bundles_and_crops_without_torch(
    settings, photo_dir, tmp_path
):
    """The shipped model's kind end to end: the frozen effnet encoder indexes the photos and
    encodes their training views once; the bundle crops on ONNX Runtime alone."""
    import subprocess
    import sys

    config = _config(tmp_path, photo_dir, 2, TINY_EFFNET, "views = 3\n")
    code, out, err = run("train", "--config", str(config))
    assert code == 0, err
    cached = list((settings.home / "cache").glob("views-*.npz"))
    assert len(cached) == 1  # six photos x 3 views, encoded once for both epochs
    code, out, err = run(
        "bundle", str(tmp_path / "run" / "last"), "-c", "six",
        "--relations", str(tmp_path / "rel.json"), "--out", str(tmp_path / "bundle"),
    )  # fmt: skip
    assert code == 0, err
    bundle = tmp_path / "bundle"
    assert json.loads((bundle / "config.json").read_text())["model"]["encoder"] == "effnet"
    images = [str(photo_dir / "chelsea.jpg"), str(photo_dir / "rocket.jpg")]
    code, out, err = run("crop", *images, "--model", str(bundle), "-n", "3", "--json")
    assert code == 0, err
    for line, path in zip(out.splitlines(), images, strict=True):
        result = json.loads(line)
        w, h = Image.open(path).size
        assert 1 <= len(result["crops"]) <= 3 and (result["width"], result["height"]) == (w, h)
    script = (
        "import sys; from procrop.cli import cli\n"
        f"cli(['crop', {images[0]!r}, '--model', {str(bundle)!r}, '-n', '3', '--json'],"
        " standalone_mode=False)\n"
        "print('torch imported:', 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert done.stdout.splitlines()[0] == out.splitlines()[0]  # the same crops in a fresh process
