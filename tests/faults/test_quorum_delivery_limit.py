"""What a quorum queue's delivery limit is spent on (issue 23, item 1).

Run these against a private node of each version (``make test-rabbitmq4``,
``make test-rabbitmq43``, or ``eval "$(scripts/cluster.sh env 4.0 pPORT)"``):
what counts towards ``x-delivery-limit`` differs between RabbitMQ 3.10, 4.0
and 4.3 (see :mod:`domain_event_broker._subscribing.settle`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from domain_event_broker import DomainEvent, Publisher, Subscriber
from domain_event_broker._amqp import names as _names
from domain_event_broker._subscribing import settle as _settle
from domain_event_broker.replay import inspect_dead_letters

from ..helpers import BROKER_URL, consumer_count, get_messages, queue_size, wait_for
from .control import REPORTS, RabbitControl, RunningSubscriber, unique

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


#: A worker process whose handler records each event's uuid and kills the
#: process (``os._exit``) or stops the worker (``sys.exit``) on the poison one.
WORKER = textwrap.dedent(
    """
    import os, sys
    from domain_event_broker import Subscriber
    url, name, routing_key, record, how = sys.argv[1:6]
    out = open(record, "a", buffering=1)
    def handler(event):
        out.write(event.uuid_string + "\\n")
        out.flush()
        if event.data.get("poison"):
            if how == "os_exit":
                os._exit(7)
            sys.exit(3)
    subscriber = Subscriber(url, timeout=10)
    subscriber.register(handler, name, [routing_key], dead_letter=True, queue_type="quorum")
    try:
        subscriber.start_consuming(timeout=3)
    finally:
        subscriber.close()
    """
)


def _publish_with_poison(routing_key: str, innocents: int) -> tuple[str, set[str]]:
    """The poison event first, then ``innocents`` ordinary ones behind it."""
    with Publisher(BROKER_URL, timeout=20) as publisher:
        poison = DomainEvent(routing_key, {"poison": True})
        publisher.publish_event(poison)
        events = [DomainEvent(routing_key, {"n": n}) for n in range(innocents)]
        for event in events:
            publisher.publish_event(event)
    return poison.uuid_string, {event.uuid_string for event in events}


def _dead_letter_uuids(name: str) -> list[str]:
    return [
        json.loads(body)["uuid_string"]
        for _, _, body in get_messages(_names.dead_letter_queue(name))
    ]


@pytest.mark.parametrize("how", ["os_exit", "sys_exit"])
def test_a_handler_that_ends_its_worker_charges_only_its_own_event(
    rabbitmq: RabbitControl, names: Any, tmp_path: Path, how: str
) -> None:
    """A handler that kills its worker (``os._exit``) or stops it
    (``sys.exit``) on one event, the worker restarted each time, as a
    supervisor does: that event alone is dead-lettered at the delivery
    limit; every other event is handled, none dead-lettered.

    Each crash used to return, and count, the 59 events the worker held
    beside the poison one: they were dead-lettered with it, unseen (F1). And
    on RabbitMQ 4.3 the ``sys.exit`` event came straight back to the
    stopping worker, was given back as a fresh copy, its count reset, and ran
    again without end (F4).
    """
    name = names.new("qpoison")
    routing_key = unique("qpoison")
    setup = Subscriber(BROKER_URL, timeout=10)
    setup.register(lambda event: None, name, [routing_key], dead_letter=True, queue_type="quorum")
    setup.close()
    poison, innocents = _publish_with_poison(routing_key, 59)
    record = tmp_path / "handled"
    record.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    dlq = _names.dead_letter_queue(name)
    restarts = 0
    for restarts in range(1, _names.QUORUM_DELIVERY_LIMIT + 10):  # noqa: B007
        subprocess.run(
            [sys.executable, "-c", WORKER, BROKER_URL, name, routing_key, str(record), how],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        handled = record.read_text().split()
        if innocents <= set(handled) and queue_size(dlq) == 1:
            break
    handled = record.read_text().split()
    dead = _dead_letter_uuids(name)
    REPORTS.append(
        f"RabbitMQ {'.'.join(map(str, rabbitmq.version()))}: a handler ending its worker "
        f"({how}) on 1 of 60 quorum events, {restarts} restarts: poison handled "
        f"{handled.count(poison)} times, {len(innocents - set(handled))} others never handled, "
        f"{len(dead)} dead-lettered ({len(set(dead) - {poison})} of them others)"
    )
    assert innocents - set(handled) == set()
    assert dead == [poison]
    # The first delivery and one per counted return, then the broker's limit.
    assert handled.count(poison) <= _names.QUORUM_DELIVERY_LIMIT + 1
    assert queue_size(name) == 0


def test_connection_losses_during_a_backlog_spend_no_delivery_limit(
    rabbitmq: RabbitControl, names: Any
) -> None:
    """More connection losses than the delivery limit while a slow handler
    works through a backlog held in its prefetch (100): every event is
    handled, none dead-lettered.

    Each loss returns, and counts, every event the worker held; the events at
    the back of the backlog sat through all of them and were dead-lettered
    unseen (F2: 41 of 100 on 3.10 with 24 losses).
    """
    name = names.new("qloss")
    routing_key = unique("qloss")
    handler = SlowRecorder(delay=0.5)
    subscriber = Subscriber(BROKER_URL, timeout=10)
    subscriber.register(handler, name, [routing_key], dead_letter=True, queue_type="quorum")
    published = _publish(routing_key, 100)
    running = RunningSubscriber(subscriber).start()
    try:
        for _ in range(STOPS):
            wait_for(lambda: consumer_count(name) == 1, timeout=30, message="consuming again")
            time.sleep(0.3)  # one event or two handled, the rest held
            rabbitmq.close_all_connections()
        during = len(set(handler.uuids))
        handler.delay = 0.0
        deadline = time.monotonic() + 60
        dlq = _names.dead_letter_queue(name)
        while time.monotonic() < deadline:  # until all are handled, or some are not there
            if set(handler.uuids) >= published:
                break
            if queue_size(dlq) and queue_size(name) == 0 and consumer_count(name) == 1:
                break
            time.sleep(0.2)
        running.stop()
    finally:
        subscriber.close()
    dead = queue_size(_names.dead_letter_queue(name))
    REPORTS.append(
        f"RabbitMQ {'.'.join(map(str, rabbitmq.version()))}: {STOPS} connection losses with "
        f"100 quorum events held: {during} handled during the losses, "
        f"{len(published - set(handler.uuids))} never handled, {dead} dead-lettered"
    )
    assert published - set(handler.uuids) == set()
    assert dead == 0
