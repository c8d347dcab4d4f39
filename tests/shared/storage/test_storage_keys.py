"""Object keys: valid collection names, and keys that are valid and derived only from inputs."""

from __future__ import annotations

import pytest

from shared.errors import ProCropError
from shared.storage import check_key
from shared.storage.keys import check_collection_name, relations_key, token_shard_key, upload_key


@pytest.mark.parametrize("name", ["a", "fcdb", "FCDB_train_2026", "x" + "1" * 254, "a_"])
def test_collection_name_accepted(name: str) -> None:
    assert check_collection_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "1abc", "_abc", "has-dash", "has space", "a/b", "a.b", "é", "x" * 256]
)
def test_collection_name_refused(name: str) -> None:
    with pytest.raises(ProCropError, match="invalid collection name") as info:
        check_collection_name(name)
    assert repr(name) in str(info.value)


def test_keys_are_valid_and_deterministic() -> None:
    sha = "ab" * 32
    assert upload_key(sha, ".JPG") == upload_key(sha, "jpg") == f"uploads/{sha}.jpg"
    assert token_shard_key("fcdb", "00003") == "collections/fcdb/tokens/00003.safetensors"
    assert relations_key("fcdb", "top10") == "collections/fcdb/relations/top10.json"
    for key in (upload_key(sha, "png"), token_shard_key("c", "0"), relations_key("c", "r")):
        assert check_key(key) == key


def test_collection_name_with_trailing_newline_refused() -> None:
    with pytest.raises(ProCropError, match="invalid collection name"):
        check_collection_name("fcdb\n")
