"""Schemathesis over the gateway's OpenAPI document, against a real gateway process on real Redis,
S3 and Milvus Lite servers (no workers: jobs stay queued). Every operation, every default check:
no 5xx but documented 503s, status codes, content types, headers and bodies as documented. Bounded
so CI stays near a minute: PROCROP_FUZZ_EXAMPLES per operation (default 60; about 1,100 cases
over the 22 operations, OPTIONS included); `benchmarks/fuzz_gateway.py` runs more and prints the figures.

One check is excluded, `positive_data_acceptance` (a request valid by the schema must get 2xx):
valid by the schema is not valid by content here, by design. An uploaded `image` is checked by its
content (random bytes are 415), ratios are limited to 1:10-10:1 and sources to what the key may
read (422): limits JSON Schema cannot state. Those answers are still checked like every other:
a documented status with a body of the documented schema. Hypothesis' health checks are off: each
case is a real HTTP round trip (`too_slow`) and multipart bodies are large to draw.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import pytest
import redis
import schemathesis
from schemathesis import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from procrop.servers import ServerProcess
from services.gateway.app import create_app
from shared.settings import load_settings
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

from .conftest import ALICE_KEY, running_gateway

FUZZ_EXAMPLES = int(os.environ.get("PROCROP_FUZZ_EXAMPLES", "60"))
FUZZ_REPORT = os.environ.get("PROCROP_FUZZ_REPORT")  # a JSON file for the benchmark, if set
STATUSES: dict[int, int] = {}  # status code -> cases, over the module
# The document as the gateway serves it (test_served_document_is_the_fuzzed_one checks that);
# built here because schemathesis parametrizes at import, before any server runs.
DOCUMENT = create_app(load_settings(only=(), api_keys="fuzz-schema-key-0123")).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def fuzz_gateway(
    s3_server: ServerProcess,
    redis_server: ServerProcess,
    milvus_server: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """One gateway process for the module, with a bucket and Redis database of its own."""
    redis_url = f"redis://127.0.0.1:{redis_server.port}/7"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCROP_")}
    env.update({
        "PROCROP_HOME": str(tmp_path_factory.mktemp("fuzz-home")),
        "PROCROP_STORAGE__BACKEND": "s3",
        "PROCROP_STORAGE__ENDPOINT": f"127.0.0.1:{s3_server.port}",
        "PROCROP_STORAGE__ACCESS_KEY": S3_ACCESS_KEY,
        "PROCROP_STORAGE__SECRET_KEY": S3_SECRET_KEY,
        "PROCROP_STORAGE__BUCKET": f"fuzz-{uuid.uuid4().hex[:12]}",
        "PROCROP_QUEUE__REDIS_URL": redis_url,
        "PROCROP_MILVUS__URI": f"http://127.0.0.1:{milvus_server.port}",
        "PROCROP_API_KEYS": ALICE_KEY,
        "PROCROP_GATEWAY__MAX_UPLOAD_MB": "1",
        "PROCROP_GATEWAY__MAX_WAIT_S": "0.2",  # `wait` is drawn too: keep each case short
    })  # fmt: skip
    with running_gateway(env) as (url, _):
        yield url
    redis.Redis.from_url(redis_url).flushdb()


def test_served_document_is_the_fuzzed_one(fuzz_gateway: str) -> None:
    assert httpx.get(fuzz_gateway + "/openapi.json").json() == DOCUMENT


@schema.parametrize()
@hypothesis.settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a CI failure reproduces
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_every_operation_keeps_its_contract(case: Case, fuzz_gateway: str) -> None:
    response = case.call_and_validate(
        base_url=fuzz_gateway,
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
        excluded_checks=[positive_data_acceptance],  # see the module docstring
    )
    STATUSES[response.status_code] = STATUSES.get(response.status_code, 0) + 1


def test_fuzzing_ran_enough_cases() -> None:
    """Runs after the operations (file order): at least 1,000 cases (or half of FUZZ_EXAMPLES per
    operation, when fewer are asked for) reached the server; a schema that generates nothing
    would pass the checks vacuously."""
    cases = sum(STATUSES.values())
    operations = sum(len(ops) for ops in DOCUMENT["paths"].values())
    if FUZZ_REPORT:
        report = {"cases": cases, "operations": operations, "statuses": STATUSES}
        Path(FUZZ_REPORT).write_text(json.dumps(report))
    print(
        f"fuzzing: {cases} cases over {operations} operations, statuses {dict(sorted(STATUSES.items()))}"
    )
    assert cases >= min(1000, FUZZ_EXAMPLES * operations // 2), STATUSES
