"""Fixtures shared by the whole suite: a real S3 server on loopback, settings, real photos."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from procrop.servers import ServerProcess, start_seaweedfs
from shared.settings import Settings, load_settings

S3_ACCESS_KEY = "procrop-test"
S3_SECRET_KEY = "procrop-test-secret"
SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "coins.png")
FCDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "fcdb" / "train"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """SeaweedFS's S3 gateway on 127.0.0.1, started once for the session."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), S3_ACCESS_KEY, S3_SECRET_KEY)
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Embedded-mode settings with all state under a fresh temporary PROCROP_HOME."""
    monkeypatch.setenv("PROCROP_HOME", str(tmp_path / "home"))
    return load_settings()


@pytest.fixture
def s3_settings(
    settings: Settings, s3_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings pointing at the loopback S3 server, with a bucket of this test's own."""
    env = {
        "PROCROP_STORAGE__BACKEND": "s3",
        "PROCROP_STORAGE__ENDPOINT": f"127.0.0.1:{s3_server.port}",
        "PROCROP_STORAGE__ACCESS_KEY": S3_ACCESS_KEY,
        "PROCROP_STORAGE__SECRET_KEY": S3_SECRET_KEY,
        "PROCROP_STORAGE__BUCKET": f"t-{uuid.uuid4().hex[:12]}",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def _skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real photos (scikit-image samples) as JPEG files, shrunk to 256 px on the long side."""
    folder = tmp_path_factory.mktemp("photos")
    for name in SAMPLES:
        image = Image.open(_skimage_data() / name).convert("RGB")
        image.thumbnail((256, 256))
        image.save(folder / (Path(name).stem + ".jpg"), quality=90)
    return folder


@pytest.fixture
def photo_copy(photo_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of `photo_dir` for tests that add or break photos."""
    return Path(shutil.copytree(photo_dir, tmp_path / "photos"))
