"""Publishing carries on through broker faults; a returned call was confirmed."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from domain_event_broker import (
    BatchPublishError,
    BrokerUnavailableError,
    DomainEvent,
    Publisher,
    PublishTimeoutError,
)
from domain_event_broker._amqp import pika_internals
from domain_event_broker._publishing.batch import MAX_IN_FLIGHT

from ..helpers import BROKER_URL, get_messages, queue_size, raw_connection, wait_for
from .control import RabbitControl, library_records, unique
from .proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

PUBLISH_LOGGER = "domain_event_broker.publish"


def _queue_for(names: Any) -> tuple[str, str]:
    """A durable queue bound to the events exchange; returns (queue, routing key)."""
    name = names.new("faults-pub")
    routing_key = unique()
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.exchange_declare("domain-events", exchange_type="topic", durable=True)
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, "domain-events", routing_key=routing_key)
    finally:
        connection.close()
    return name, routing_key


def _uuids_in(name: str) -> list[str]:
    return [DomainEvent.from_json(body).uuid_string for _, _, body in get_messages(name)]


def _one_loss_one_recovery(caplog: pytest.LogCaptureFixture) -> None:
    warnings = [r for r in library_records(caplog, logging.WARNING) if r.name == PUBLISH_LOGGER]
    infos = [r for r in library_records(caplog, logging.INFO) if r.name == PUBLISH_LOGGER]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert len(infos) == 1, [r.getMessage() for r in infos]
    assert all(r.exc_info is None for r in warnings + infos), "no tracebacks"


def test_publish_after_connection_closed_by_broker(
    rabbitmq: RabbitControl, names: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    name, routing_key = _queue_for(names)
    with Publisher(BROKER_URL, timeout=20) as publisher:
        first = publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
        rabbitmq.close_all_connections()
        second = publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
    assert _uuids_in(name) == [first.uuid_string, second.uuid_string]
    _one_loss_one_recovery(caplog)


def test_publish_after_lost_socket(
    names: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    name, routing_key = _queue_for(names)
    with Publisher(proxy.url(BROKER_URL), timeout=20) as publisher:
        first = publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
        assert proxy.cut() == 1
        second = publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
    assert proxy.accepted == 2
    assert _uuids_in(name) == [first.uuid_string, second.uuid_string]
    _one_loss_one_recovery(caplog)


def test_publish_during_outage_retries_until_its_deadline(
    rabbitmq: RabbitControl, names: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    name, routing_key = _queue_for(names)
    publisher = Publisher(BROKER_URL, timeout=2)
    publisher.connect()
    rabbitmq.stop_app()

    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError):
        publisher.publish_event(DomainEvent(routing_key, {"n": "lost"}))
    elapsed = time.monotonic() - started
    assert 1.0 < elapsed < 4.0, elapsed

    # A publish that starts during the outage and ends after it returns
    # only once confirmed.
    patient = Publisher(BROKER_URL, timeout=60)
    outcome: list[Any] = []

    def publish() -> None:
        try:
            outcome.append(patient.publish_event(DomainEvent(routing_key, {"n": "kept"})))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    rabbitmq.start_app()
    thread.join(60)
    patient.close()
    publisher.close()
    assert len(outcome) == 1 and isinstance(outcome[0], DomainEvent), outcome
    assert _uuids_in(name) == [outcome[0].uuid_string]


def test_blocked_publish_fails_within_its_timeout(rabbitmq: RabbitControl, names: Any) -> None:
    name, routing_key = _queue_for(names)
    with Publisher(BROKER_URL, timeout=3) as publisher:
        publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
        rabbitmq.set_memory_alarm()

        started = time.monotonic()
        with pytest.raises(PublishTimeoutError) as info:
            publisher.publish_event(DomainEvent(routing_key, {"n": "blocked"}))
        elapsed = time.monotonic() - started
        assert elapsed < 3 + 2, elapsed
        # Issue 23, item 19: it was sent, so it may have reached the broker.
        assert info.value.maybe_delivered is True
        assert "blocked the connection" in str(info.value)
        assert "may or may not have reached the broker" in str(info.value)

        rabbitmq.clear_memory_alarm()
        publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
    # The blocked message may or may not have been taken in before the
    # alarm; the two others were confirmed.
    wait_for(lambda: (queue_size(name) or 0) >= 2)


def test_blocked_batch_fails_with_publish_timeout_error(
    rabbitmq: RabbitControl, names: Any
) -> None:
    """Issue 23, item 7: a batch on a blocked connection fails with the
    documented PublishTimeoutError, each event marked as maybe delivered."""
    name, routing_key = _queue_for(names)
    events = [DomainEvent(routing_key, {"n": n}) for n in range(100)]
    with Publisher(BROKER_URL, timeout=3) as publisher:
        publisher.publish_many(events[:1])
        rabbitmq.set_memory_alarm()
        started = time.monotonic()
        with pytest.raises(BatchPublishError) as info:
            publisher.publish_many(events[1:])
        elapsed = time.monotonic() - started
        assert elapsed < 3 + 2, elapsed
        error = info.value
        assert [event for event, _ in error.failed] == events[1:]
        for _, cause in error.failed:
            assert isinstance(cause, PublishTimeoutError), cause
        # Those written may have reached the broker: all 99 with pika's fast
        # paths (a pipeline), the first only on pika's own paths (one by one).
        maybe = sum(cause.maybe_delivered for _, cause in error.failed)
        assert maybe == 99 if pika_internals.FAST_PATHS_ACTIVE else maybe >= 1
        assert error.maybe_delivered is True
        assert "blocked the connection" in str(error)
        assert f"{maybe} of them may have reached the broker" in str(error)
        rabbitmq.clear_memory_alarm()
        publisher.publish_many([event for event, _ in error.failed])
    # At least once: each arrived, some maybe twice.
    wanted = {event.uuid_string for event in events}
    seen: set[str] = set()

    def all_arrived() -> bool:
        seen.update(_uuids_in(name))
        return seen >= wanted

    wait_for(all_arrived, timeout=20, message="every event of the batch")


def test_blocked_batch_tells_the_events_never_sent(rabbitmq: RabbitControl, names: Any) -> None:
    """Events of a blocked batch that were never written to the connection
    (past the in-flight window, or after the first on pika's own paths) are
    not "maybe delivered": only those written are (found by the attack)."""
    name, routing_key = _queue_for(names)
    events = [DomainEvent(routing_key, {"n": n}) for n in range(1500)]
    with Publisher(BROKER_URL, timeout=3) as publisher:
        publisher.publish_many(events[:1])
        rabbitmq.set_memory_alarm()
        try:
            with pytest.raises(BatchPublishError) as info:
                publisher.publish_many(events[1:])
        finally:
            rabbitmq.clear_memory_alarm()
    causes = [cause for _, cause in info.value.failed]
    assert len(causes) == 1499
    assert all(isinstance(cause, PublishTimeoutError) for cause in causes)
    unsent = [cause for cause in causes if not cause.maybe_delivered]
    assert len(unsent) >= 1499 - MAX_IN_FLIGHT, len(unsent)
    assert all("not sent, so it did not reach the broker" in str(cause) for cause in unsent)
    maybe = 1499 - len(unsent)
    assert f"{maybe} of them may have reached the broker" in str(info.value)
    # What was never sent cannot arrive (now or later): none of it is queued.
    unsent_uuids = {event.uuid_string for event, cause in info.value.failed if cause in unsent}
    wait_for(lambda: queue_size(name) >= 1, timeout=20, message="the first event")
    assert not unsent_uuids & set(_uuids_in(name))


def test_publisher_fails_over_to_the_next_url(
    names: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The first node (a proxy standing in for it) goes down: the second takes over."""
    caplog.set_level(logging.INFO)
    name, routing_key = _queue_for(names)
    with Publisher([proxy.url(BROKER_URL), BROKER_URL], timeout=20) as publisher:
        first = publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
        assert proxy.open_connections == 1
        proxy.refuse()
        proxy.cut()
        second = publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
        assert proxy.open_connections == 0
    assert _uuids_in(name) == [first.uuid_string, second.uuid_string]
    _one_loss_one_recovery(caplog)


def test_publish_on_a_silent_wire(
    names: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Missed heartbeats end the confirm wait; the publish goes out on a new connection."""
    caplog.set_level(logging.INFO)
    name, routing_key = _queue_for(names)
    with Publisher(proxy.url(BROKER_URL, heartbeat="1"), timeout=20) as publisher:
        first = publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
        proxy.freeze()
        started = time.monotonic()
        second = publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
        elapsed = time.monotonic() - started
    assert proxy.accepted == 2
    assert elapsed < 15, elapsed
    # The frozen first attempt may or may not have reached the broker.
    uuids = _uuids_in(name)
    assert uuids[0] == first.uuid_string and uuids[-1] == second.uuid_string, uuids
    _one_loss_one_recovery(caplog)


def test_idle_connection_closed_for_missed_heartbeats_is_no_warning(
    names: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A blocking connection sends no heartbeats while idle; the broker closes it."""
    caplog.set_level(logging.INFO)
    name, routing_key = _queue_for(names)
    with Publisher(proxy.url(BROKER_URL, heartbeat="1"), timeout=20) as publisher:
        first = publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
        wait_for(lambda: proxy.open_connections == 0, timeout=20, message="the broker to close")
        second = publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
    assert _uuids_in(name) == [first.uuid_string, second.uuid_string]
    records = [r for r in caplog.records if r.name == PUBLISH_LOGGER]
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO], records
    assert "idle" in records[0].getMessage()
