"""Runtime configuration: one typed settings object, read from `PROCROP_*` environment variables.

Nested fields use `__`: `PROCROP_STORAGE__BACKEND=s3`, `PROCROP_MILVUS__URI=http://milvus:19530`.
Invalid values fail with a `SettingsError` that names the environment variable.

Each command validates what it uses: `load_settings(only=...)` checks the named top-level fields
("storage", "queue", "api_keys"...) at once, and defers the others, so `procrop crop` runs with a
bad `PROCROP_QUEUE__REDIS_URL` it never reads. A deferred field that is invalid raises its
`SettingsError` when it is first read. Services check their own fields at start
(`Settings.check`: the gateway in `create_app`, workers in `procrop worker`), so they still fail
fast. `load_settings()` with no `only` checks everything, as before.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import SettingsError

ENV_PREFIX = "PROCROP_"
MIN_API_KEY_LENGTH = 16
_SECRET_FIELDS = {"api_keys", "secret_key", "token", "chat_api_key"}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


# torch devices the workers and the CLI accept (a typo was a traceback from torch at model load).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


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
    # Buckets other than `bucket` that tenants' index jobs may read (comma-separated); none by
    # default: the S3 credential may read more than a tenant should (shared/ownership.py).
    index_buckets: str = ""

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

    @field_validator("index_buckets")
    @classmethod
    def _bucket_names(cls, value: str) -> str:
        for name in value.split(","):
            if name.strip() and not _BUCKET.fullmatch(name.strip()):
                raise ValueError("comma-separated S3 bucket names")
        return value

    @property
    def index_bucket_set(self) -> frozenset[str]:
        """`index_buckets` as a set of names."""
        return frozenset(b.strip() for b in self.index_buckets.split(",") if b.strip())


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
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)  # "auto": cuda when available
    batch_size: int = Field(default=8, ge=1, le=256)


class CropSettings(BaseModel):
    """The crop model (services/cropper)."""

    model: str | None = None  # checkpoint or bundle folder, or s3:// prefix; None: shipped lite
    collection: str | None = None  # composition index to retrieve from; None: the bundle's own
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    runtime: Literal["auto", "onnx", "torch"] = "auto"  # auto: ONNX Runtime for bundles on a CPU
    quantized: bool = True  # on ONNX Runtime, the bundle's int8 graph where it has one
    batch_size: int = Field(default=16, ge=1, le=1024)


class QueueSettings(BaseModel):
    """Celery on Redis (shared/queue.py): the broker, job records, and task limits."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # broker and job records (shared/jobs.py)
    # Hard and soft limits per task; the slowest task (one ControlNet out-paint on a CPU) takes
    # about 5 minutes, one batch of an indexing job well under that.
    time_limit_s: int = Field(default=900, ge=1)
    soft_time_limit_s: int = Field(default=840, ge=1)
    # The lease of a delivered task (shared/leases.py): its worker renews it while it lives, so a
    # dead worker's tasks go back to their queues after about this long, however long tasks run.
    visibility_timeout_s: int = Field(default=30, ge=5, le=3600)
    max_retries: int = Field(default=5, ge=0)  # transient failures (Redis, S3, Milvus hiccups)
    retry_backoff_max_s: int = Field(default=60, ge=1)
    concurrency: int = Field(default=1, ge=1, le=64)  # processes per worker; 1 per GPU
    # prefork: models load in pool processes, a pool process that dies has its task re-queued at
    # once; solo: the task runs in the worker process itself (no pipe hop, one task at a time).
    pool: Literal["prefork", "solo"] = "prefork"
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)  # how long job records are kept
    index_batch: int = Field(default=256, ge=1, le=10_000)  # photos per indexing task
    # A crop job no message holds (lost with a dying worker) is sent again once its record has
    # not moved for this long (shared/recovery.py; the gateway checks every recover_every_s).
    # 0: never.
    recover_after_s: int = Field(default=120, ge=0)
    recover_every_s: int = Field(default=30, ge=1, le=3600)
    # Prometheus metrics of a worker's tasks (shared/worker_metrics.py) on this port; 0: off (the
    # local stack runs several workers on one host). Kubernetes pods set 9464 and host 0.0.0.0.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// (or rediss://, unix://) URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _limits_in_order(self) -> QueueSettings:
        if not self.soft_time_limit_s <= self.time_limit_s:
            raise ValueError(
                "need soft_time_limit_s <= time_limit_s (the soft limit warns a task before the "
                f"hard one kills it), got {self.soft_time_limit_s}, {self.time_limit_s}"
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


class CadSettings(BaseModel):
    """CAD dataset generation (services/outpainter): canvases, description, masks, fill, filter.

    The quality filter's thresholds are documented with `services.outpainter.quality`.
    """

    canvas_min: int = Field(default=700, ge=64, le=4096)  # canvas sides are drawn in this range
    canvas_max: int = Field(default=1024, ge=64, le=4096)
    # The placed photo's size as a share of the largest size that fits the canvas.
    scale_min: float = Field(default=0.55, gt=0, le=1)
    scale_max: float = Field(default=0.9, gt=0, le=1)
    min_photo_side: int = Field(default=128, ge=16)  # smaller photos are reported, not used
    describer: Literal["layout", "lm", "chat"] = "layout"  # lm / chat: BLIP caption + a LM
    language_model: str = "Qwen/Qwen2.5-0.5B-Instruct"  # describer "lm": hub id or local folder
    chat_url: str | None = None  # describer "chat": an OpenAI-compatible base URL (.../v1)
    chat_model: str = "gpt-4o-mini"
    chat_api_key: SecretStr = SecretStr("")
    max_new_tokens: int = Field(default=48, ge=1, le=512)
    masks: Literal["segments", "sam"] = "segments"  # segments: scikit-image, no weights
    mask_scales: int = Field(default=2, ge=1, le=4)
    outpainter: Literal["lite", "controlnet"] = "lite"  # lite: OpenCV in-painting on a CPU
    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local folder
    controlnet_inpaint: str = "lllyasviel/control_v11p_sd15_inpaint"
    controlnet_seg: str | None = "lllyasviel/control_v11p_sd15_seg"  # None: inpaint control only
    steps: int = Field(default=30, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0)
    work_side: int = Field(default=512, ge=64, le=2048)  # the diffusion model's canvas long side
    dtype: Literal["auto", "float16", "float32"] = "auto"  # auto: float16 on a GPU
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    batch_size: int = Field(default=4, ge=1, le=64)
    # Quality filter (see services/outpainter/quality.py for what each measures).
    seam_max: float = Field(default=2.5, gt=0)
    colour_max: float = Field(default=0.35, gt=0)
    detail_min: float = Field(default=0.02, ge=0)
    flat_min: float = Field(default=0.02, ge=0)
    repeat_max: float = Field(default=0.6, gt=0, le=1)
    # Runs: items (photo, variant) in flight at once, and the largest run a request may ask for.
    max_in_flight: int = Field(default=32, ge=1, le=100_000)
    max_variants: int = Field(default=16, ge=1, le=1000)
    max_items: int = Field(default=10_000_000, ge=1)

    @model_validator(mode="after")
    def _ranges_in_order(self) -> CadSettings:
        if self.canvas_min > self.canvas_max or self.scale_min > self.scale_max:
            raise ValueError(
                "need canvas_min <= canvas_max and scale_min <= scale_max, got "
                f"{self.canvas_min}, {self.canvas_max}, {self.scale_min}, {self.scale_max}"
            )
        return self


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
    cad: CadSettings = CadSettings()
    # Gateway API keys, comma-separated; clients send `Authorization: Bearer KEY`.
    api_keys: SecretStr = SecretStr("")
    # Fields whose values were invalid and not checked yet: field -> the problem, raised on use.
    _deferred: dict[str, str] = PrivateAttr(default_factory=dict)

    if not TYPE_CHECKING:  # at run time only: mypy keeps checking attribute names

        def __getattribute__(self, name: str) -> Any:
            if name in _FIELDS:
                deferred = object.__getattribute__(self, "__pydantic_private__") or {}
                problem = deferred.get("_deferred", {}).get(name)
                if problem:
                    raise SettingsError(f"invalid settings: {problem}")
            return super().__getattribute__(name)

    def check(self, *fields: str) -> Settings:
        """Raise the `SettingsError` of any of `fields` (top-level names; none: all) that is
        invalid; returns self. Services call it at start for the fields they use."""
        deferred: dict[str, str] = object.__getattribute__(self, "__pydantic_private__")[
            "_deferred"
        ]
        problems = [p for f, p in deferred.items() if not fields or f in fields]
        if problems:
            raise SettingsError(f"invalid settings: {'; '.join(problems)}")
        return self

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


def load_settings(only: Iterable[str] | None = None, **overrides: object) -> Settings:
    """Read settings from the environment (and keyword overrides).

    Args:
        only: top-level fields to check now ("storage", "queue", "api_keys"...); an invalid
            other field is deferred (its default in its place, its `SettingsError` raised when it
            is read). None: check every field.
    Raises:
        SettingsError: naming each invalid variable that is checked, on one line.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems: dict[str, list[str]] = {}
        for err in exc.errors():
            shown = _shown(err["loc"], err.get("input"))
            problems.setdefault(str(err["loc"][0]), []).append(
                f"{_env_name(err['loc'])}: {err['msg']} (got {shown})"
            )
    checked = list(problems) if only is None else [f for f in problems if f in set(only)]
    if checked:
        raise SettingsError(
            f"invalid settings: {'; '.join(p for f in checked for p in problems[f])}"
        )
    defaults = {name: Settings.model_fields[name].get_default() for name in problems}
    settings = Settings(**{**overrides, **defaults})
    settings._deferred = {name: "; ".join(found) for name, found in problems.items()}
    return settings


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once; a service checks the fields it uses at start."""
    return load_settings(only=())


_FIELDS = frozenset(Settings.model_fields)
