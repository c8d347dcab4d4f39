"""`procrop crop --json` answers byte for byte what was recorded (scripts/record_crops.py) for the
demo photos and 50 FCDB photos: refactors of the crop path must not change a single crop."""

from __future__ import annotations

import json

import pytest

from scripts.record_crops import FCDB, OUT, crop_lines, model_digest, photos

RECORDED = json.loads(OUT.read_text())


@pytest.fixture(scope="module")
def paths():
    if not FCDB.is_dir():
        pytest.skip(f"FCDB not found at {FCDB}")
    found = photos()
    assert [p.name for p in found] == RECORDED["photos"]
    return found


def test_recording_is_of_the_shipped_model():
    assert model_digest() == RECORDED["model_sha256"], (
        "the shipped model changed: re-record with scripts/record_crops.py"
    )


@pytest.mark.parametrize("request_name", sorted(RECORDED["requests"]))
def test_crops_equal_the_recording(paths, request_name):
    got = crop_lines(paths, RECORDED["requests"][request_name])
    expected = RECORDED["outputs"][request_name]
    assert len(got) == len(expected)
    for line, want in zip(got, expected, strict=True):
        assert line == want
