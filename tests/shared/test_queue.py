"""The shared Celery app: routing by task name, delivery guarantees, and the settings behind them."""

from __future__ import annotations

import pytest
from celery import Celery

from shared.errors import SettingsError
from shared.queue import (
    CROP,
    EMBED,
    INDEX_BATCH,
    INDEX_PLAN,
    QUEUES,
    RETRIEVE,
    create_app,
    queue_of,
)
from shared.settings import MIN_API_KEY_LENGTH, Settings, load_settings

TASKS = {
    EMBED: "embed",
    RETRIEVE: "retrieve",
    CROP: "crop",
    INDEX_PLAN: "index",
    INDEX_BATCH: "index",
}


pytestmark = pytest.mark.usefixtures("clean_env")  # see tests/conftest.py


@pytest.fixture
def queue_settings() -> Settings:
    return load_settings(
        queue={"time_limit_s": 120, "soft_time_limit_s": 100, "visibility_timeout_s": 300}
    )


@pytest.fixture
def app(queue_settings: Settings) -> Celery:
    return create_app(queue_settings)


@pytest.mark.parametrize(("task", "queue"), TASKS.items())
def test_queue_of_every_task(task: str, queue: str) -> None:
    assert queue_of(task) == queue
    assert queue in QUEUES


@pytest.mark.parametrize(
    "name",
    ["", "procrop", "procrop.embed", "celery.embed.features", "procrop.nope.x", "embed.features"],
)
def test_queue_of_malformed_names_raises(name: str) -> None:
    with pytest.raises(ValueError, match=r"procrop\.<queue>\.<what>"):
        queue_of(name)


def test_messages_are_json_only(app: Celery) -> None:
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]


def test_delivery_survives_a_dead_worker(app: Celery, queue_settings: Settings) -> None:
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.task_ignore_result is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_time_limit == queue_settings.queue.time_limit_s == 120
    assert app.conf.task_soft_time_limit == 100


def test_visibility_timeout_outlasts_the_slowest_task(app: Celery) -> None:
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 300
    assert options["visibility_timeout"] > app.conf.task_time_limit


def test_broker_is_the_configured_redis() -> None:
    app = create_app(load_settings(queue={"redis_url": "redis://127.0.0.1:6390/3"}))
    assert app.conf.broker_url == "redis://127.0.0.1:6390/3"


@pytest.mark.parametrize(("task", "queue"), TASKS.items())
def test_tasks_route_to_their_queue(app: Celery, task: str, queue: str) -> None:
    route = app.amqp.router.route({}, task)
    assert route["queue"].name == queue


def test_other_tasks_go_to_the_default_queue(app: Celery) -> None:
    assert app.amqp.router.route({}, "celery.ping")["queue"].name == app.conf.task_default_queue


def test_every_queue_is_declared(app: Celery) -> None:
    assert set(app.amqp.queues) == set(QUEUES)


@pytest.mark.parametrize(
    "queue",
    [
        {"time_limit_s": 600, "soft_time_limit_s": 500, "visibility_timeout_s": 600},
        {"time_limit_s": 900, "soft_time_limit_s": 800, "visibility_timeout_s": 300},
        {"time_limit_s": 100, "soft_time_limit_s": 200, "visibility_timeout_s": 300},
    ],
)
def test_limits_out_of_order_are_refused(queue: dict[str, int]) -> None:
    with pytest.raises(SettingsError, match="PROCROP_QUEUE") as info:
        load_settings(queue=queue)
    assert "visibility_timeout_s" in str(info.value)


def test_limits_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_QUEUE__TIME_LIMIT_S", "4000")
    with pytest.raises(SettingsError, match="PROCROP_QUEUE"):
        load_settings()


def test_redis_url_needs_a_redis_scheme() -> None:
    with pytest.raises(SettingsError, match="PROCROP_QUEUE__REDIS_URL"):
        load_settings(queue={"redis_url": "http://127.0.0.1:6379"})


def test_short_api_key_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    short = "tiny-secret-k3y"
    assert len(short) < MIN_API_KEY_LENGTH
    monkeypatch.setenv("PROCROP_API_KEYS", f"a-long-enough-key-0001,{short}")
    with pytest.raises(SettingsError, match="PROCROP_API_KEYS") as info:
        load_settings()
    message = str(info.value)
    assert short not in message and "a-long-enough-key-0001" not in message
    assert "1 of 2" in message


def test_api_key_list_splits_on_commas_and_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCROP_API_KEYS", " alice-key-0123456789 ,bob-key-0123456789,, ")
    settings = load_settings()
    assert settings.api_key_list == ["alice-key-0123456789", "bob-key-0123456789"]
    assert "alice-key" not in repr(settings)  # a secret in reprs and logs


def test_no_api_keys_is_an_empty_list() -> None:
    assert load_settings().api_key_list == []
