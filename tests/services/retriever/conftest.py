from __future__ import annotations

import pytest

from services.embedder.lite import LiteCompositionEncoder
from shared.settings import Settings
from shared.storage import build_object_store
from shared.vector_index import VectorIndex, open_index


@pytest.fixture
def encoder() -> LiteCompositionEncoder:
    return LiteCompositionEncoder()


@pytest.fixture
def index(settings: Settings) -> VectorIndex:
    return open_index(settings)


@pytest.fixture
def store(settings: Settings):
    return build_object_store(settings)
