"""The gateway's request and response bodies (they make the OpenAPI document)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from shared.crop_request import MAX_ASPECT_RATIOS, MAX_CROPS, MAX_RATIO_CHARS, RATIO_PATTERN
from shared.ownership import MAX_SOURCE_CHARS, UPLOAD_KEY_PATTERN

_RATIO_TOKEN = RATIO_PATTERN.removeprefix("^").removesuffix("$")
RATIO_FIELD_CHARS = MAX_ASPECT_RATIOS * (MAX_RATIO_CHARS + 1)
# One multipart `aspect_ratios` field: ratios separated by commas, blanks allowed.
RatioField = Annotated[
    str,
    Field(
        max_length=RATIO_FIELD_CHARS,
        examples=["16:9,1:1"],
        json_schema_extra={"pattern": rf"^({_RATIO_TOKEN})?(,({_RATIO_TOKEN})?)*$"},
    ),
]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# The pattern is documented, not enforced by pydantic: `check_crop_request` answers with a
# clearer reason (and checks the 1:10 to 10:1 range a pattern cannot state).
AspectRatioText = Annotated[
    str,
    Field(
        max_length=MAX_RATIO_CHARS, examples=["16:9"], json_schema_extra={"pattern": RATIO_PATTERN}
    ),
]


class Error(BaseModel):
    """Every 4xx and 5xx answer: one line saying what was wrong."""

    detail: str = Field(examples=["n must be between 1 and 100, got 0"])


class CropRequest(BaseModel):
    """A crop job for a photo already in the object store (JSON body of POST /v1/crops)."""

    image_key: str = Field(
        pattern=UPLOAD_KEY_PATTERN,
        max_length=77,
        description="A photo you uploaded before, by the key its upload was stored under "
        "(uploads/{sha256}.{jpg|png|webp}); another key's uploads are 404, like missing ones.",
        examples=["uploads/" + "0" * 64 + ".jpg"],
    )
    n: int = Field(default=5, ge=1, le=MAX_CROPS, description="Crops per photo (per ratio).")
    aspect_ratios: list[AspectRatioText] = Field(
        default_factory=list,
        max_length=MAX_ASPECT_RATIOS,
        description="'W:H' ratios from 1:10 to 10:1; with them, n crops per ratio at exactly "
        "that ratio.",
        examples=[["16:9", "1:1"]],
    )
    wait: float = Field(
        default=0,
        ge=0,
        description="Seconds to wait for the result before answering 202 (at most "
        "PROCROP_GATEWAY__MAX_WAIT_S; longer waits are cut to it).",
    )


class CropMultipartForm(BaseModel):
    """POST /v1/crops as multipart/form-data: the photo and the same fields as `CropRequest`."""

    image: bytes = Field(
        description="The photo (JPEG, PNG or WebP), checked by its content; at most "
        "PROCROP_GATEWAY__MAX_UPLOAD_MB (413 over it) and PROCROP_MAX_IMAGE_PIXELS pixels."
    )
    n: int = Field(default=5, ge=1, le=MAX_CROPS)
    aspect_ratios: list[RatioField] = Field(
        default_factory=list,
        max_length=MAX_ASPECT_RATIOS,
        description="'W:H' from 1:10 to 10:1: repeat the field, or separate ratios with commas "
        "(empty ones are skipped); at most 16 ratios in all. At most 32 form fields, one file.",
    )
    wait: float = Field(default=0, ge=0)


class Crop(BaseModel):
    box: list[int] = Field(description="Pixel [x1, y1, x2, y2] in the original photo.")
    score: float = Field(description="Aesthetic score in [0, 1].")
    aspect_ratio: str | None = Field(description="The requested 'W:H' this crop has, or null.")


class CropResult(BaseModel):
    width: int
    height: int
    crops: list[Crop] = Field(
        description="The best-scored first, then the alternatives in the order the model picked "
        "them (the shipped model: those adding the most cover of its nearest compositions' "
        "crops); with aspect ratios, every ratio's first crop before any ratio's second."
    )


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus


class CropJob(BaseModel):
    """A crop job: its state and, once it succeeded, its crops."""

    job_id: str
    status: JobStatus
    result: CropResult | None = None
    error: str | None = None
    created: float = Field(description="Unix time the job was submitted.")
    updated: float = Field(description="Unix time of its last change.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")


class IndexRequest(BaseModel):
    """POST /v1/collections/{name}/index: ingest photos under an object-store prefix."""

    source: str = Field(
        min_length=1,
        max_length=MAX_SOURCE_CHARS,
        description="A key prefix in the gateway's bucket ('pro/photos/'), not under uploads/, "
        "jobs/, features/, datasets/, collections/ or checkpoints/; or s3://bucket/prefix of a "
        "bucket in PROCROP_STORAGE__INDEX_BUCKETS.",
        examples=["pro/photos/"],
    )
    encoder: Literal["effnet", "lite", "sam"] | None = Field(
        default=None, description="Composition encoder [default: the workers' setting]."
    )
    annotations_key: str | None = Field(
        default=None,
        max_length=MAX_SOURCE_CHARS,
        description="Object key of crop annotations (FCDB JSON) for the photos, outside the "
        "gateway's own areas (as `source`).",
    )


class Progress(BaseModel):
    done: int = 0
    total: int = 0


class Job(BaseModel):
    """Any job (crop or index): state, progress and, when finished, its result."""

    job_id: str
    kind: Literal["crop", "index"]
    status: JobStatus
    progress: Progress
    result: dict[str, Any] | None = Field(
        default=None, description="Crop jobs: their CropResult; index jobs: their report."
    )
    error: str | None = None
    created: float
    updated: float
    timings: dict[str, float] = Field(default_factory=dict)


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


def first_error(errors: Sequence[Any]) -> str:
    """A pydantic validation error list -> one line, `where: what` (the first error)."""
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"
