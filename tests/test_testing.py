"""domain_event_broker.testing: capture_events() needs no broker."""

from __future__ import annotations

import threading

import pytest

from domain_event_broker import (
    BrokerUnavailableError,
    DomainEvent,
    Publisher,
    configure,
    publish_domain_event,
)
from domain_event_broker.testing import capture_events

#: Nothing listens here: a publish that tried to send would fail.
NOWHERE = "amqp://guest:guest@127.0.0.1:1/%2F"


def test_captures_instead_of_sending() -> None:
    configure(broker=NOWHERE, timeout=0.5)
    with capture_events() as events:
        event = publish_domain_event("user.registered", {"id": 1})
    assert events == [event]
    assert events[0].data == {"id": 1}


def test_captures_publisher_events_and_disabled_broker() -> None:
    with capture_events() as events:
        publish_domain_event("a.b", {}, connection_settings=None)
        Publisher(NOWHERE, timeout=0.5).publish_event(DomainEvent("c.d", {}))
    assert [e.routing_key for e in events] == ["a.b", "c.d"]


def test_bad_input_is_still_refused() -> None:
    with capture_events() as events:
        with pytest.raises(ValueError):
            publish_domain_event("", {})
        with pytest.raises(TypeError):
            publish_domain_event("a.b", {"x": object()})
    assert events == []


def test_events_from_other_threads_are_captured() -> None:
    with capture_events() as events:
        threads = [
            threading.Thread(
                target=publish_domain_event, args=("t.x", {"i": i}, None, None, None, None)
            )
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(e.data["i"] for e in events) == list(range(8))


def test_nested_blocks_each_record_and_stop_recording_on_exit() -> None:
    with capture_events() as outer:
        publish_domain_event("one.x", {}, connection_settings=None)
        with capture_events() as inner:
            publish_domain_event("two.x", {}, connection_settings=None)
        publish_domain_event("three.x", {}, connection_settings=None)
    publish_domain_event("four.x", {}, connection_settings=None)
    assert [e.routing_key for e in outer] == ["one.x", "two.x", "three.x"]
    assert [e.routing_key for e in inner] == ["two.x"]


def test_after_the_block_publishing_sends_again() -> None:
    with capture_events():
        pass
    configure(timeout=0.5)
    with pytest.raises(BrokerUnavailableError):
        publish_domain_event("a.b", {}, connection_settings=NOWHERE)
