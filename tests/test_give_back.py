"""A stopping worker gives the events no handler started back to a quorum
queue as copies (issue 23, item 1); the many-stops scenario on each RabbitMQ
version is in ``tests/faults/test_quorum_delivery_limit.py``."""

from __future__ import annotations

import logging
import time
from typing import Any

import pika
import pytest

from domain_event_broker import DomainEvent, Subscriber

from .conftest import Names
from .helpers import queue_size, raw_connection, wait_for


def _publish(name: str, count: int, expiration: str | None = None) -> list[str]:
    """Publish ``count`` events straight to queue ``name``, with a header of their own."""
    uuids = []
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for n in range(count):
            event = DomainEvent("giveback.x", {"n": n})
            channel.basic_publish(
                "",
                name,
                event.to_json(),
                pika.BasicProperties(
                    delivery_mode=2,
                    message_id=event.uuid_string,
                    headers={"tenant": "t1"},
                    expiration=expiration,
                ),
            )
            uuids.append(event.uuid_string)
    finally:
        connection.close()
    return uuids


def _redeliver_all(name: str, count: int) -> None:
    """Take ``count`` messages unacknowledged and close: the broker marks them redelivered."""
    connection = raw_connection()
    try:
        channel = connection.channel()
        for _ in range(count):
            method, _, _ = channel.basic_get(name)
            assert method is not None
    finally:
        connection.close()


def _run_until(subscriber: Subscriber, done: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        subscriber.start_consuming(timeout=0.5)


def test_unstarted_events_come_back_whole_and_keep_the_redelivered_hint(names: Names) -> None:
    name = names.new("giveback")
    seen: list[DomainEvent] = []
    subscriber = Subscriber()

    def handler(event: DomainEvent) -> None:
        seen.append(event)
        if len(seen) == 1:
            subscriber.stop_consuming()  # the others arrived and are not started

    subscriber.register(handler, name, ["giveback.x"], dead_letter=True, queue_type="quorum")
    try:
        uuids = _publish(name, 5)
        wait_for(lambda: queue_size(name) == 5, timeout=10, message="the events")
        _redeliver_all(name, 2)  # the first two are marked redelivered
        wait_for(lambda: queue_size(name) == 5, timeout=10, message="the events back")
        subscriber.start_consuming(timeout=10)
        assert len(seen) == 1
        _run_until(subscriber, lambda: len(seen) == 5)
    finally:
        subscriber.close()
    assert sorted(event.uuid_string for event in seen) == sorted(uuids)
    assert queue_size(f"{name}-dl") == 0
    redelivered = {event.uuid_string: event.redelivered for event in seen}
    assert redelivered == {uuid: index < 2 for index, uuid in enumerate(uuids)}


def test_a_copy_that_cannot_be_routed_returns_the_event_instead(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler's queue no longer bound to ``name-retry-durable``: the
    unstarted events go back as they are (counted), with a WARNING, and the
    connection stays up."""
    name = names.new("giveback")
    seen: list[DomainEvent] = []
    subscriber = Subscriber()

    def handler(event: DomainEvent) -> None:
        seen.append(event)
        if len(seen) == 1:
            subscriber.stop_consuming()

    subscriber.register(handler, name, ["giveback.x"], queue_type="quorum")
    connection = raw_connection()
    try:
        connection.channel().queue_unbind(name, f"{name}-retry-durable", routing_key="")
    finally:
        connection.close()
    caplog.set_level(logging.WARNING, logger="domain_event_broker")
    try:
        uuids = _publish(name, 5)
        wait_for(lambda: queue_size(name) == 5, timeout=10, message="the events")
        subscriber.start_consuming(timeout=10)
        assert len(seen) == 1
        wait_for(lambda: queue_size(name) == 4, timeout=10, message="the events back")
        _run_until(subscriber, lambda: len(seen) == 5)
    finally:
        subscriber.close()
    assert sorted(event.uuid_string for event in seen) == sorted(uuids)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("domain_event_broker")]
    assert any("Could not give an unstarted event" in m for m in messages), messages
    assert not any("Lost the connection" in m for m in messages), messages


def test_given_back_copies_keep_the_publishers_expiration(names: Names) -> None:
    """A given-back copy stands in for a requeue: unlike a retry or dead-letter
    copy, it keeps the message's ``expiration``."""
    name = names.new("giveback")
    seen: list[DomainEvent] = []
    subscriber = Subscriber()

    def handler(event: DomainEvent) -> None:
        seen.append(event)
        subscriber.stop_consuming()

    subscriber.register(handler, name, ["giveback.x"], queue_type="quorum")
    try:
        _publish(name, 3, expiration="600000")
        wait_for(lambda: queue_size(name) == 3, timeout=10, message="the events")
        subscriber.start_consuming(timeout=10)
        assert len(seen) == 1
        wait_for(lambda: queue_size(name) == 2, timeout=10, message="the events back")
    finally:
        subscriber.close()
    connection = raw_connection()
    try:
        channel = connection.channel()
        for _ in range(2):
            method, properties, _ = channel.basic_get(name, auto_ack=True)
            assert method is not None
            assert properties.expiration == "600000"
            assert "x-original-expiration" not in (properties.headers or {})
    finally:
        connection.close()
