"""Jepsen-style count: events published while faults happen are never lost.

A thread publishes events one after the other and records each one only
once its publish call returned (the broker confirmed it). A subscriber
consumes meanwhile. The broker closes every connection, restarts, closes
every connection again. Afterwards every recorded event must have been
consumed at least once (lost = 0); duplicates are allowed (at-least-once)
and counted.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any

import pytest

from domain_event_broker import BrokerError, DomainEvent, Publisher, Subscriber

from ..helpers import BROKER_URL, wait_for
from .control import REPORTS, RabbitControl, Recorder, unique

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

#: Events to publish; the faults are spread over them.
EVENTS = 1500
#: Pause between two publish calls, so that the faults hit a running stream.
PACE = 0.005


class Stream:
    """Publishes ``count`` events from a thread; records what returned."""

    def __init__(self, routing_key: str, count: int) -> None:
        self.routing_key = routing_key
        self.count = count
        self.confirmed: list[str] = []
        self.failed: list[tuple[str, BaseException]] = []
        self.thread = threading.Thread(target=self._run, name="jepsen-publisher", daemon=True)

    def _run(self) -> None:
        with Publisher(BROKER_URL, timeout=30) as publisher:
            for n in range(self.count):
                event = DomainEvent(self.routing_key, {"n": n})
                try:
                    publisher.publish_event(event)
                except BrokerError as exc:
                    self.failed.append((event.uuid_string, exc))
                else:
                    self.confirmed.append(event.uuid_string)
                time.sleep(PACE)

    def attempted(self) -> int:
        return len(self.confirmed) + len(self.failed)


def test_no_confirmed_event_is_lost(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any
) -> None:
    name = names.new("faults-jepsen")
    routing_key = unique()
    recorder = Recorder()
    subscriber = Subscriber(BROKER_URL, timeout=10)
    subscriber.register(recorder, name, [routing_key])
    runner = run_subscriber(subscriber)

    stream = Stream(routing_key, EVENTS)
    started = time.monotonic()
    stream.thread.start()
    faults = [
        (EVENTS * 2 // 10, "close_all_connections", rabbitmq.close_all_connections),
        (EVENTS * 4 // 10, "restart", lambda: (rabbitmq.stop_app(), rabbitmq.start_app())),
        (EVENTS * 7 // 10, "close_all_connections", rabbitmq.close_all_connections),
    ]
    for at, label, inject in faults:
        wait_for(lambda at=at: stream.attempted() >= at, timeout=60, message=f"{at} publishes")
        inject()
        print(f"fault {label} injected after {stream.attempted()} publish calls")
    stream.thread.join(120)
    assert not stream.thread.is_alive()

    confirmed = set(stream.confirmed)
    with contextlib.suppress(AssertionError):  # what is missing is counted below
        wait_for(lambda: confirmed <= set(recorder.uuids()), timeout=60)
    runner.assert_running()
    runner.stop()

    counts = collections.Counter(recorder.uuids())
    lost = len(confirmed - counts.keys())
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unconfirmed_delivered = len({u for u, _ in stream.failed} & counts.keys())
    line = (
        f"jepsen: {EVENTS} publish calls, {len(confirmed)} confirmed, "
        f"{len(stream.failed)} raised ({unconfirmed_delivered} of them delivered anyway), "
        f"{counts.total()} deliveries, lost={lost}, duplicates={duplicates}, "
        f"faults={len(faults)}, {time.monotonic() - started:.1f}s"
    )
    print(line)
    REPORTS.append(line)
    assert lost == 0
    assert not stream.failed, stream.failed[:3]
