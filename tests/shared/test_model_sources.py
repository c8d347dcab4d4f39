"""Where pretrained weights come from: names resolved, loaders run local-first, weights digested."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ModelLoadError
from shared.model_sources import (
    load_local_first,
    resolve_source,
    source_version,
    weight_files,
    weights_digest,
)


def test_folders_paths_and_hub_ids(tmp_path: Path) -> None:
    assert resolve_source(tmp_path, "model") == (str(tmp_path), True)
    assert resolve_source("org/name", "model") == ("org/name", False)
    with pytest.raises(ModelLoadError, match="model folder not found"):
        resolve_source(str(tmp_path / "none"), "model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="model path is not a folder"):
        resolve_source(tmp_path / "file", "model")


def test_local_first_then_the_hub_and_one_line_errors() -> None:
    calls: list[bool] = []

    def read(offline: bool) -> str:
        calls.append(offline)
        if offline:
            raise OSError("not in the cache\nsecond line")
        return "downloaded"

    assert load_local_first(read, "org/name", False, "model") == "downloaded"
    assert calls == [True, False]
    calls.clear()
    with pytest.raises(ModelLoadError, match=r"^cannot load model from /f: not in the cache$"):
        load_local_first(read, "/f", True, "model")
    assert calls == [True]  # a folder never goes to the hub


def test_digest_covers_the_files_from_pretrained_reads(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    for part in ("unet", "vae"):
        (tmp_path / part).mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"unet")
    (tmp_path / "unet" / "w.fp16.safetensors").write_bytes(b"half")  # a variant: not read
    (tmp_path / "unet" / "w.bin").write_bytes(b"old")  # safetensors preferred
    (tmp_path / "vae" / "w.bin").write_bytes(b"vae")
    (tmp_path / "single.safetensors").write_bytes(b"checkpoint")  # top level of a pipeline
    rel = [str(p.relative_to(tmp_path)) for p in weight_files(tmp_path)]
    assert rel == ["unet/w.safetensors", "vae/w.bin"]
    before = weights_digest(tmp_path)
    (tmp_path / "unet" / "w.fp16.safetensors").write_bytes(b"other")
    assert weights_digest(tmp_path) == before
    (tmp_path / "vae" / "w.bin").write_bytes(b"VAE")
    assert weights_digest(tmp_path) != before
    assert source_version(str(tmp_path), True) == f"{tmp_path.name}:{weights_digest(tmp_path)}"
    assert source_version("procrop-tests/not-cached", False) == "procrop-tests/not-cached"
