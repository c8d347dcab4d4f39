"""Fixtures shared by the whole suite: a real S3 server on loopback, settings, real photos."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from procrop.servers import ServerProcess, start_redis, start_seaweedfs
from services.embedder.sam import SAM_BUILDERS
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """redis-server on 127.0.0.1, started once for the session (tests use their own db or keys)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: ServerProcess) -> Iterator[str]:
    """A Redis URL on the session server; the database is emptied after the test."""
    import redis

    url = f"redis://127.0.0.1:{redis_server.port}/0"
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No `PROCROP_*` variable from the outer environment, and a throwaway HOME."""
    for name in list(os.environ):
        if name.upper().startswith("PROCROP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))


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


# Tiny seeded SAM and BLIP models, saved to a temp folder like real weights (embedder and
# paper-profile tests load them through the same code real weights take).
TINY_WORDS = [
    *("a", "an", "the", "photo", "photography", "of", "man", "woman", "dog", "cat"),
    *("on", "in", "at", "beach", "street", "sky", "sea", "left", "right"),
]
# BERT-style special tokens first (ids 0-4), BLIP's [DEC] (caption start) and [ENC] last
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS, "[DEC]", "[ENC]"]


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `.pth` state dict of the seeded "vit_tiny" SAM, as real SAM checkpoints are stored."""
    torch.manual_seed(0)
    sam = SAM_BUILDERS["vit_tiny"]()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path


def _tiny_blip_config(vocab_size: int, image_size: int = 32) -> BlipConfig:
    """Two-layer, 32-wide BLIP with token ids matching `TINY_VOCAB`."""
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": TINY_VOCAB.index("[PAD]"),
        "sep_token_id": TINY_VOCAB.index("[SEP]"),  # ends a caption
        "eos_token_id": TINY_VOCAB.index("[SEP]"),
        "bos_token_id": TINY_VOCAB.index("[DEC]"),  # starts a caption
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 16,
        "initializer_range": 0.02,  # the default 1e-10 makes every photo look the same
    }
    return BlipConfig(
        text_config=text, vision_config=vision, image_text_hidden_size=16, projection_dim=16
    )


def _tiny_blip_processor(folder: Path, image_size: int = 32) -> BlipProcessor:
    """A BERT word-piece tokenizer over `TINY_VOCAB` and a BLIP image processor at `image_size`."""
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_VOCAB) + "\n")
    tokenizer = BertTokenizer(
        vocab=str(vocab_file), bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    images = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=images, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_blip_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded tiny BLIP captioner ("caption") and image-text model ("itm"), each in a folder
    written by `save_pretrained` with its processor, as on the hub."""
    root = tmp_path_factory.mktemp("blip")
    processor = _tiny_blip_processor(root)
    config = _tiny_blip_config(len(TINY_VOCAB))
    folders = {}
    for seed, (kind, model_class) in enumerate(
        [("caption", BlipForConditionalGeneration), ("itm", BlipForImageTextRetrieval)]
    ):
        torch.manual_seed(seed)
        folders[kind] = root / kind
        model_class(config).save_pretrained(folders[kind])
        processor.save_pretrained(folders[kind])
    return folders
