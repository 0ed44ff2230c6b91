"""What a quorum queue's delivery limit is spent on (issue 23, item 1).

Run these against a private node of each version (``make test-rabbitmq4``,
``make test-rabbitmq43``, or ``eval "$(scripts/cluster.sh env 4.0 pPORT)"``):
what counts towards ``x-delivery-limit`` differs between RabbitMQ 3.10, 4.0
and 4.3 (see :mod:`domain_event_broker._subscribing.settle`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from domain_event_broker import DomainEvent, Publisher, Subscriber
from domain_event_broker._amqp import names as _names
from domain_event_broker._subscribing import settle as _settle
from domain_event_broker.replay import inspect_dead_letters

from ..helpers import BROKER_URL, queue_size, wait_for
from .control import REPORTS, RabbitControl, unique

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

#: More graceful stops than the delivery limit allows returns.
STOPS = _names.QUORUM_DELIVERY_LIMIT + 6
EVENTS = 60


class SlowRecorder:
    """Records every event's uuid; slow until told otherwise."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.uuids: list[str] = []

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.uuids.append(event.uuid_string)
        time.sleep(self.delay)


def _publish(routing_key: str, count: int) -> set[str]:
    with Publisher(BROKER_URL, timeout=20) as publisher:
        events = [DomainEvent(routing_key, {"n": n}) for n in range(count)]
        for event in events:
            publisher.publish_event(event)
    return {event.uuid_string for event in events}


def test_graceful_stops_spend_no_delivery_limit(rabbitmq: RabbitControl, names: Any) -> None:
    """A backlog, a slow handler and more graceful stops than the delivery
    limit: every event reaches the handler, none is dead-lettered.

    Each stop returns the prefetched events no handler started (up to 99 with
    the default prefetch); on RabbitMQ 3.10 and 4.0 every such return used to
    count towards ``x-delivery-limit``, so the events at the back of the
    backlog were dead-lettered unseen.
    """
    name = names.new("qlimit")
    routing_key = unique("qlimit")
    handler = SlowRecorder(delay=0.25)
    subscriber = Subscriber(BROKER_URL, timeout=10)
    subscriber.register(handler, name, [routing_key], dead_letter=True, queue_type="quorum")
    published = _publish(routing_key, EVENTS)
    try:
        for _ in range(STOPS):
            subscriber.start_consuming(timeout=0.25)
        stopped_with = len(set(handler.uuids))
        handler.delay = 0.0
        deadline = time.monotonic() + 60
        while set(handler.uuids) != published and time.monotonic() < deadline:
            subscriber.start_consuming(timeout=1.0)
    finally:
        subscriber.close()
    dead = queue_size(_names.dead_letter_queue(name))
    REPORTS.append(
        f"RabbitMQ {'.'.join(map(str, rabbitmq.version()))}: {STOPS} graceful stops with "
        f"{EVENTS} quorum events: {stopped_with} handled during the stops, "
        f"{len(published - set(handler.uuids))} never handled, {dead} dead-lettered"
    )
    assert published - set(handler.uuids) == set()
    assert dead == 0
    assert queue_size(name) == 0


def test_inspecting_a_quorum_dead_letter_often_keeps_it(
    rabbitmq: RabbitControl, names: Any
) -> None:
    """``inspect`` returns what it looked at, which counts as a delivery: on
    RabbitMQ 4 a quorum ``-dl`` with the default limit dropped a dead letter
    at about the 21st look."""
    name = names.new("qinspect")
    routing_key = unique("qinspect")

    def fail(event: DomainEvent) -> None:
        raise RuntimeError("into the dead-letter queue")

    subscriber = Subscriber(BROKER_URL, timeout=10)
    subscriber.register(fail, name, [routing_key], dead_letter=True, queue_type="quorum")
    (uuid,) = _publish(routing_key, 1)
    dlq = _names.dead_letter_queue(name)
    try:
        deadline = time.monotonic() + 30
        while queue_size(dlq) != 1 and time.monotonic() < deadline:
            subscriber.start_consuming(timeout=0.5)
    finally:
        subscriber.close()
    assert queue_size(dlq) == 1
    looks = _names.QUORUM_DELIVERY_LIMIT + 5
    for look in range(looks):
        # Returning what the last look held takes the broker a moment.
        wait_for(lambda: queue_size(dlq) == 1, timeout=10, message=f"the letter, look {look + 1}")
        letters = inspect_dead_letters(name, BROKER_URL)
        seen = [letter.event.uuid_string for letter in letters if letter.event is not None]
        assert seen == [uuid], f"look {look + 1}"
    assert queue_size(dlq) == 1
    REPORTS.append(
        f"RabbitMQ {'.'.join(map(str, rabbitmq.version()))}: a quorum dead letter "
        f"inspected {looks} times is still there"
    )


def test_a_move_that_keeps_failing_ends_at_the_delivery_limit(
    rabbitmq: RabbitControl, names: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead letter whose copy cannot be made goes back to the queue; that
    return must count towards the delivery limit on every version. It was a
    ``basic.nack``, which RabbitMQ 4.3 does not count: the handler ran again
    and again without end (a hot loop)."""
    name = names.new("qmove")
    routing_key = unique("qmove")
    calls: list[float] = []

    def fail(event: DomainEvent) -> None:
        calls.append(time.monotonic())
        raise RuntimeError("to be dead-lettered")

    def cannot_copy(*args: object) -> None:
        raise RuntimeError("the copy cannot be made")

    # Every copy the worker makes fails for a reason other than the broker's.
    monkeypatch.setattr(_settle, "_fit_copy", cannot_copy)
    subscriber = Subscriber(BROKER_URL, timeout=10)
    subscriber.register(fail, name, [routing_key], dead_letter=True, queue_type="quorum")
    _publish(routing_key, 1)
    dlq = _names.dead_letter_queue(name)
    try:
        # Long enough for hundreds of rounds of a hot loop.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and queue_size(dlq) == 0:
            subscriber.start_consuming(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        subscriber.close()
    REPORTS.append(
        f"RabbitMQ {'.'.join(map(str, rabbitmq.version()))}: a dead letter that cannot be "
        f"copied was handled {len(calls)} times"
    )
    # The first delivery and one per counted return; then the broker
    # dead-letters it (reason delivery_limit), at least once.
    assert len(calls) <= _names.QUORUM_DELIVERY_LIMIT + 1
    wait_for(lambda: queue_size(dlq) == 1, timeout=20, message="the broker's dead letter")
    assert queue_size(name) == 0
