"""Settings: defaults, `PROCROP_*` overrides with `__` nesting, errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import SettingsError
from shared.settings import Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.home == tmp_path / "user" / ".procrop"  # "~" expanded
    assert settings.profile == "lite"
    assert settings.max_image_pixels == 50_000_000
    assert settings.log_level == "INFO"
    assert settings.storage.backend == "local"
    assert settings.storage.endpoint == "127.0.0.1:9000"
    assert settings.storage.bucket == "procrop"
    assert settings.storage.secure is False
    assert settings.embedder.encoder == "effnet"
    assert settings.embedder.batch_size == 8
    assert settings.milvus.timeout_s == 30.0


def test_paths_derive_from_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROCROP_HOME", str(tmp_path / "state"))
    settings = load_settings()
    assert settings.home == tmp_path / "state"
    assert settings.storage_root == tmp_path / "state" / "objects"
    assert settings.milvus_uri == str(tmp_path / "state" / "milvus.db")


def test_home_expands_tilde(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROCROP_HOME", "~/procrop-state")
    settings = load_settings()
    assert settings.home == tmp_path / "user" / "procrop-state"
    assert "~" not in str(settings.storage_root)


def test_explicit_storage_root_and_milvus_uri_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROCROP_STORAGE__ROOT", "~/objects-elsewhere")
    monkeypatch.setenv("PROCROP_MILVUS__URI", "http://milvus:19530")
    settings = load_settings()
    assert settings.storage_root == tmp_path / "user" / "objects-elsewhere"
    assert settings.milvus_uri == "http://milvus:19530"


def test_env_overrides_top_level_and_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "PROCROP_PROFILE": "paper",
        "PROCROP_MAX_IMAGE_PIXELS": "1234",
        "PROCROP_STORAGE__BACKEND": "s3",
        "PROCROP_STORAGE__ENDPOINT": "minio:9000",
        "PROCROP_STORAGE__SECRET_KEY": "s3cr3t",
        "PROCROP_STORAGE__SECURE": "true",
        "PROCROP_EMBEDDER__BATCH_SIZE": "32",
        "PROCROP_MILVUS__TIMEOUT_S": "2.5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.profile == "paper"
    assert settings.max_image_pixels == 1234
    assert settings.storage.backend == "s3"
    assert settings.storage.endpoint == "minio:9000"
    assert settings.storage.secure is True
    assert settings.storage.secret_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(settings)  # secrets stay out of logs
    assert settings.embedder.batch_size == 32
    assert settings.milvus.timeout_s == 2.5


def test_keyword_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_PROFILE", "paper")
    assert load_settings(profile="lite").profile == "lite"


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE", "paper")
    monkeypatch.setenv("STORAGE__BACKEND", "s3")
    settings = load_settings()
    assert settings.profile == "lite" and settings.storage.backend == "local"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROCROP_STORAGE__BACKEND", "ftp"),
        ("PROCROP_MAX_IMAGE_PIXELS", "-1"),
        ("PROCROP_MAX_IMAGE_PIXELS", "lots"),
        ("PROCROP_STORAGE__ENDPOINT", "http://x:9000"),
        ("PROCROP_STORAGE__ENDPOINT", "x:9000/bucket"),
        ("PROCROP_STORAGE__SECURE", "maybe"),
        ("PROCROP_PROFILE", "huge"),
        ("PROCROP_LOG_LEVEL", "LOUD"),
        ("PROCROP_EMBEDDER__ENCODER", "clip"),
        ("PROCROP_EMBEDDER__BATCH_SIZE", "0"),
        ("PROCROP_MILVUS__TIMEOUT_S", "0"),
        ("PROCROP_CROP__DEVICE", "bogus"),  # was a traceback from torch at model load
        ("PROCROP_EMBEDDER__DEVICE", "cuda:x"),
        ("PROCROP_CAD__DEVICE", "gpu"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message
    assert repr(value) in message  # the bad value is shown, quoted
    assert "\n" not in message  # one line, printable as-is by the CLI


def test_every_invalid_variable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_STORAGE__BACKEND", "ftp")
    monkeypatch.setenv("PROCROP_MAX_IMAGE_PIXELS", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "PROCROP_STORAGE__BACKEND" in str(info.value)
    assert "PROCROP_MAX_IMAGE_PIXELS" in str(info.value)


def test_invalid_keyword_override_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="PROCROP_MAX_IMAGE_PIXELS"):
        load_settings(max_image_pixels=0)


def test_settings_is_a_plain_value() -> None:
    assert isinstance(load_settings(), Settings)
    assert load_settings() == load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PROCROP_STORAGE__BUCKET", "Bad_Bucket"), ("PROCROP_STORAGE__ENDPOINT", "minio:notaport")],
)
def test_invalid_s3_names_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_unchecked_fields_are_deferred_until_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", "http://not-redis")
    monkeypatch.setenv("PROCROP_API_KEYS", "short")
    monkeypatch.setenv("PROCROP_CROP__BATCH_SIZE", "4")
    settings = load_settings(only=("crop",))
    assert settings.crop.batch_size == 4  # valid fields keep their values
    with pytest.raises(SettingsError, match="PROCROP_QUEUE__REDIS_URL"):
        _ = settings.queue
    with pytest.raises(SettingsError, match="PROCROP_API_KEYS"):
        _ = settings.api_key_list  # properties read the field too
    with pytest.raises(SettingsError, match="PROCROP_QUEUE__REDIS_URL") as info:
        settings.check("queue", "crop")
    assert "PROCROP_API_KEYS" not in str(info.value)  # only the fields asked for
    assert settings.check("crop", "storage") is settings


def test_checked_fields_fail_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_QUEUE__REDIS_URL", "http://not-redis")
    monkeypatch.setenv("PROCROP_GATEWAY__PORT", "0")
    with pytest.raises(SettingsError, match="PROCROP_GATEWAY__PORT") as info:
        load_settings(only=("gateway",))
    assert "PROCROP_QUEUE__REDIS_URL" not in str(info.value)
    assert load_settings(only=("storage",)).storage.bucket == "procrop"
