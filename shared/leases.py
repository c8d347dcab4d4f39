"""Leases on delivered messages: a live worker keeps its tasks, a dead one's return within a minute.

Kombu's Redis transport records every message it delivers but has not had acknowledged in two
keys: the hash `unacked` (delivery tag -> the message, its exchange and routing key) and the
sorted set `unacked_index` (delivery tag -> when it was delivered). Every consumer periodically
runs `QoS.restore_visible`, which pushes back to its queue each message whose score is older than
the visibility timeout (under the lock `unacked_mutex`, one message at a time in a transaction on
`unacked`, so two consumers never restore one message twice).

That score is the lease. `LeaseKeeper`, a step of each worker's consumer, renews it: every
`visibility_timeout / 5` seconds a thread of the worker's main process sets the score of every
message its channel still holds (delivered, not yet acknowledged: running, prefetched or waiting
for its ETA) to now, with `ZADD XX` (only members that still exist: an acknowledgement racing
the renewal wins, and nothing is re-added). A worker that is gone renews nothing, so within about
one visibility timeout (plus one restore interval) another worker's `restore_visible` returns its
messages to their queues. The visibility timeout becomes a short lease (30 s by default) rather
than a bound on the slowest task: a task of an hour keeps its message as long as its worker lives.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import bootsteps

log = logging.getLogger(__name__)
RENEWALS_PER_LEASE = 5  # renewals per visibility timeout: four may be missed before a redelivery


class LeaseKeeper(bootsteps.StartStopStep):
    """Consumer step: renews the lease of every message this worker holds (see module docs).

    The consumer's blueprint restarts its steps on every reconnection; `start` then points the
    renewal thread at the new channel (the old channel's messages were cancelled with their tasks
    and come back through `restore_visible` like a dead worker's; a closed channel holds nothing,
    so renewing it does nothing). Stopping the consumer does not stop the renewals: in a warm
    shutdown the consumer stops first and the pool then finishes its running tasks, whose leases
    must hold until they are acknowledged. The thread ends with the process (a daemon)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._channel: Any = None
        self._thread: threading.Thread | None = None

    def start(self, c: Any) -> None:
        self._channel = c.task_consumer.channel
        if self._thread is None:
            options = c.app.conf.broker_transport_options
            interval = max(0.5, options["visibility_timeout"] / RENEWALS_PER_LEASE)
            client = redis.Redis.from_url(
                c.app.conf.broker_url, socket_connect_timeout=5, socket_timeout=5
            )
            self._thread = threading.Thread(
                target=self._renew_forever, args=(client, interval), name="lease-keeper",
                daemon=True,
            )  # fmt: skip
            self._thread.start()

    def _renew_forever(self, client: redis.Redis, interval: float) -> None:
        while True:
            time.sleep(interval)
            channel = self._channel
            if channel is None:
                continue
            try:
                renew(client, channel)
            except redis.RedisError as exc:  # the broker is away: the consumer reconnects
                log.warning("could not renew message leases: %s", exc)


def held_tags(channel: Any) -> list[str]:
    """Delivery tags the channel holds: delivered to it, not acknowledged (nor being so)."""
    qos = channel.qos
    dirty = set(qos._dirty)  # acknowledged, removal from `_delivered` pending
    return [tag for tag in list(qos._delivered) if tag not in dirty]


def renew(client: redis.Redis, channel: Any) -> int:
    """Renew the lease of every message the channel holds; returns how many were renewed."""
    tags = held_tags(channel)
    if not tags:
        return 0
    now = time.time()
    renewed = client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True, ch=True)
    return int(renewed or 0)
