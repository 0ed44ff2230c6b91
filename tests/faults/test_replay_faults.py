"""A replay run carries on through broker faults."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pika
import pytest

from domain_event_broker import RETRY, DomainEvent, Subscriber
from domain_event_broker._deadletters.operations import replay_dead_letters

from ..helpers import raw_connection, wait_for
from .control import RabbitControl, library_records, unique

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

RUN_LOGGER = "domain_event_broker._deadletters.run"


def _noop(event: DomainEvent) -> None:
    return None


def _drain(queue: str) -> list[int]:
    """The events' ``n`` in ``queue``, taken out of it."""
    numbers: list[int] = []
    connection = raw_connection()
    try:
        channel = connection.channel()
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return numbers
            numbers.append(json.loads(body)["data"]["n"])
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("interactive", [False, True], ids=["batch", "interactive"])
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_replay_callback_past_consumer_timeout(
    rabbitmq: RabbitControl,
    names: Any,
    caplog: pytest.LogCaptureFixture,
    queue_type: str,
    interactive: bool,
) -> None:
    """A replay callback holds the dead letters past consumer_timeout.

    Before RabbitMQ 4.3 the broker closes the run's channel; from 4.3 on a
    quorum ``-dl`` queue cancels the run's consumer instead (and puts the dead
    letters back, ignoring late acknowledgements), and a classic one has no
    timeout. Each way every dead letter is replayed once and leaves ``-dl``:
    the run neither commits acknowledgements the broker ignores (copies
    replayed, dead letters left behind) nor waits for deliveries that never
    come. An interactive callback (one that takes ``keepalive`` and calls it
    while a person decides) has its answers carried out one by one.
    """
    caplog.set_level(logging.INFO)
    name = names.new("faults-replay")
    routing_key = unique()
    with Subscriber(timeout=10) as subscriber:
        subscriber.register(_noop, name, [routing_key], dead_letter=True, queue_type=queue_type)
    connection = raw_connection()
    try:
        channel = connection.channel()
        for n in range(3):
            channel.basic_publish(
                f"{name}-dlx-durable",
                routing_key,
                DomainEvent(routing_key, {"n": n}).to_json().encode(),
                pika.BasicProperties(delivery_mode=2),
            )
    finally:
        connection.close()
    wait_for(lambda: rabbitmq.queue_messages(f"{name}-dl") == 3, message="the dead letters")
    # Read by each new channel: a 1 s consumer timeout, checked twice a second.
    rabbitmq.set_env(consumer_timeout=1000, channel_tick_interval=500)
    seen: list[int] = []

    def slow_callback(event: DomainEvent) -> str:
        seen.append(event.data["n"])
        if len(seen) == 1:
            time.sleep(3)  # the run holds all three meanwhile
        return RETRY

    def person(event: DomainEvent, keepalive: Any) -> str:
        seen.append(event.data["n"])
        if len(seen) == 1:
            for _ in range(15):  # thinking for 3 s, the connection kept alive
                time.sleep(0.2)
                keepalive()
        return RETRY

    started = time.monotonic()
    result = replay_dead_letters(name, person if interactive else slow_callback)

    assert time.monotonic() - started < 30, "the run stalled"
    assert (result.replayed, result.remaining) == (3, 0)
    assert sorted(_drain(name)) == [0, 1, 2]  # each once
    assert _drain(f"{name}-dl") == []
    assert seen[:3] == [0, 1, 2]
    if rabbitmq.version() >= (4, 3) and queue_type == "quorum":
        # One per timeout: the person held the event on screen for about three.
        warnings = [r for r in library_records(caplog, logging.WARNING) if r.name == RUN_LOGGER]
        expected = range(1, 5) if interactive else range(1, 2)
        assert len(warnings) in expected, [r.getMessage() for r in warnings]
        for warning in warnings:
            assert "cancelled this run's consumer" in warning.getMessage()
            assert "consumer_timeout" in warning.getMessage()
