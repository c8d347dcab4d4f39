"""Runtime configuration: one typed settings object, read from `PROCROP_*` environment variables.

Nested fields use `__`: `PROCROP_STORAGE__BACKEND=s3`, `PROCROP_MILVUS__URI=http://milvus:19530`.
Invalid values fail at start with a `SettingsError` that names the environment variable.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import SettingsError

ENV_PREFIX = "PROCROP_"
MIN_API_KEY_LENGTH = 16
_SECRET_FIELDS = {"api_keys", "secret_key", "token"}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StorageSettings(BaseModel):
    """Object storage for images, tokens, features, manifests and checkpoints (see shared/storage)."""

    backend: Literal["local", "s3"] = "local"  # local: a folder with S3 semantics (embedded mode)
    root: Path | None = None  # local backend folder; default $PROCROP_HOME/objects
    endpoint: str = "127.0.0.1:9000"  # S3 host:port, no scheme
    access_key: str = ""
    secret_key: SecretStr = SecretStr("")
    bucket: str = "procrop"
    secure: bool = False  # https when true
    region: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if "://" in value or "/" in value:
            raise ValueError(f"expected host:port without scheme or path, got {value!r}")
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port with a port in 1-65535, got {value!r}")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not _BUCKET.fullmatch(value):
            raise ValueError("an S3 bucket name: 3-63 lowercase letters, digits, '.' or '-'")
        return value


class MilvusSettings(BaseModel):
    """The composition index: Milvus Lite in a file (default) or any Milvus URI."""

    uri: str | None = None  # default: $PROCROP_HOME/milvus.db (Milvus Lite, one process)
    token: SecretStr = SecretStr("")  # "user:password" or an API key for a Milvus server
    timeout_s: float = Field(default=30.0, gt=0)
    # FLAT: exact, and in Milvus Lite 3.2 as fast as any index (its per-row Python scan dominates;
    # see benchmarks/bench_retrieval.py). HNSW / IVF_FLAT for large collections on a Milvus server.
    index_type: Literal["FLAT", "HNSW", "IVF_FLAT"] = "FLAT"


class EmbedderSettings(BaseModel):
    """Composition encoders (services/embedder)."""

    encoder: Literal["lite", "effnet", "sam"] = "effnet"  # `procrop index`'s; models name their own
    runtime: Literal["auto", "onnx", "torch"] = "auto"  # effnet: ONNX Runtime on a CPU
    sam_variant: Literal["vit_b", "vit_l", "vit_h", "vit_tiny"] = "vit_b"  # vit_tiny: tests
    sam_checkpoint: str | None = None  # path of a local SAM .pth checkpoint
    blip_model: str = (
        "Salesforce/blip-itm-base-coco"  # image-text model for the multimodal embedding
    )
    blip_caption_model: str = "Salesforce/blip-image-captioning-base"  # hub id or local folder
    device: str = "auto"  # "auto" picks cuda when available
    batch_size: int = Field(default=8, ge=1, le=256)


class CropSettings(BaseModel):
    """The crop model (services/cropper)."""

    model: str | None = None  # checkpoint or bundle folder, or s3:// prefix; None: shipped lite
    collection: str | None = None  # composition index to retrieve from; None: the bundle's own
    device: str = "auto"
    runtime: Literal["auto", "onnx", "torch"] = "auto"  # auto: ONNX Runtime for bundles on a CPU
    batch_size: int = Field(default=16, ge=1, le=1024)


class QueueSettings(BaseModel):
    """Celery on Redis (shared/queue.py): the broker, job records, and task limits."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # broker and job records (shared/jobs.py)
    # Hard and soft limits per task; the slowest task (one ControlNet out-paint on a CPU) takes
    # about 5 minutes, one batch of an indexing job well under that.
    time_limit_s: int = Field(default=900, ge=1)
    soft_time_limit_s: int = Field(default=840, ge=1)
    # An unacknowledged task comes back after this long (its worker died): longer than any task.
    visibility_timeout_s: int = Field(default=3600, ge=1)
    max_retries: int = Field(default=5, ge=0)  # transient failures (Redis, S3, Milvus hiccups)
    retry_backoff_max_s: int = Field(default=60, ge=1)
    concurrency: int = Field(default=1, ge=1, le=64)  # processes per worker; 1 per GPU
    # prefork: models load in pool processes, a pool process that dies has its task re-queued at
    # once; solo: the task runs in the worker process itself (no pipe hop, one task at a time).
    pool: Literal["prefork", "solo"] = "prefork"
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)  # how long job records are kept
    index_batch: int = Field(default=256, ge=1, le=10_000)  # photos per indexing task

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// (or rediss://, unix://) URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _limits_in_order(self) -> QueueSettings:
        if not self.soft_time_limit_s <= self.time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "need soft_time_limit_s <= time_limit_s < visibility_timeout_s (a task must end "
                f"before Redis hands it to another worker), got {self.soft_time_limit_s}, "
                f"{self.time_limit_s}, {self.visibility_timeout_s}"
            )
        return self


class GatewaySettings(BaseModel):
    """The HTTP gateway (services/gateway)."""

    max_upload_mb: float = Field(default=25.0, gt=0)  # enforced while the body streams in
    max_wait_s: float = Field(default=60.0, ge=0)  # longest `wait` a request may ask for
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Settings(BaseSettings):
    """Everything a ProCrop process reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_ignore_empty=True,  # PROCROP_CROP__MODEL= means the default, not ""
        extra="ignore",
        validate_default=True,
    )

    home: Path = Path("~/.procrop")  # embedded state: Milvus Lite file, local object store
    profile: Literal["lite", "paper"] = "lite"
    max_image_pixels: int = Field(default=50_000_000, gt=0)  # decompression-bomb guard
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    storage: StorageSettings = StorageSettings()
    milvus: MilvusSettings = MilvusSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    crop: CropSettings = CropSettings()
    queue: QueueSettings = QueueSettings()
    gateway: GatewaySettings = GatewaySettings()
    # Gateway API keys, comma-separated; clients send `Authorization: Bearer KEY`.
    api_keys: SecretStr = SecretStr("")

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: SecretStr) -> SecretStr:
        keys = [k.strip() for k in value.get_secret_value().split(",") if k.strip()]
        short = [k for k in keys if len(k) < MIN_API_KEY_LENGTH]
        if short:
            raise ValueError(
                f"API keys must be at least {MIN_API_KEY_LENGTH} characters; "
                f"{len(short)} of {len(keys)} are shorter"
            )
        return value

    @property
    def api_key_list(self) -> list[str]:
        """The gateway's API keys (empty: none configured)."""
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    @property
    def storage_root(self) -> Path:
        """Folder of the local object store."""
        return (self.storage.root or self.home / "objects").expanduser()

    @property
    def milvus_uri(self) -> str:
        """Milvus URI: a server address, or the Milvus Lite file under `home`."""
        return self.milvus.uri or str(self.home / "milvus.db")


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def _shown(loc: tuple[int | str, ...], value: object) -> str:
    """The bad value for an error message; secrets are never echoed."""
    secret = any(str(part) in _SECRET_FIELDS for part in loc)
    return "a hidden value" if secret else repr(value)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and keyword overrides); raise `SettingsError` if invalid."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{_env_name(err['loc'])}: {err['msg']} (got {_shown(err['loc'], err.get('input'))})"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
