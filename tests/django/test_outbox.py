"""The transactional outbox and its relay, against real databases and the broker."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections, transaction
from django.utils import timezone

from domain_event_broker import BatchPublishError, BrokerError, DomainEvent, configure
from domain_event_broker.django.models import OutboxEvent
from domain_event_broker.django.outbox import prune_sent_events, publish_via_outbox
from domain_event_broker.django.relay import OutboxRelay

from ..helpers import wait_for
from .support import DEAD_BROKER_URL, EventQueue, LimitedQueue


class RollbackError(Exception):
    pass


class SimulatedCrash(BaseException):
    """Stands for the process dying: not an Exception, nothing catches it."""


def pending(db_alias: str) -> list[str]:
    return list(
        OutboxEvent.objects.using(db_alias)
        .filter(sent_at__isnull=True)
        .order_by("id")
        .values_list("uuid_string", flat=True)
    )


def write_events(db_alias: str, queue: EventQueue | LimitedQueue, count: int) -> list[DomainEvent]:
    with transaction.atomic(using=db_alias):
        return [
            publish_via_outbox(queue.key(), {"n": n}, str(n), using=db_alias) for n in range(count)
        ]


def test_event_is_written_in_the_callers_transaction(db_alias: str) -> None:
    with transaction.atomic(using=db_alias):
        event = publish_via_outbox("test.outbox", {"a": 1}, "obj", using=db_alias)
    row = OutboxEvent.objects.using(db_alias).get()
    assert (row.routing_key, row.uuid_string, row.sent_at) == (
        "test.outbox",
        event.uuid_string,
        None,
    )
    assert DomainEvent.from_json(row.body) == event

    with pytest.raises(RollbackError), transaction.atomic(using=db_alias):
        publish_via_outbox("test.outbox", {"a": 2}, using=db_alias)
        raise RollbackError
    assert OutboxEvent.objects.using(db_alias).count() == 1


def test_bad_input_is_rejected_before_writing(db_alias: str) -> None:
    with pytest.raises(TypeError):
        publish_via_outbox("test.outbox", {"x": object()}, using=db_alias)
    with pytest.raises(ValueError, match="routing_key"):
        publish_via_outbox("", {}, using=db_alias)
    assert not OutboxEvent.objects.using(db_alias).exists()


def test_relay_publishes_in_order_and_marks_sent(db_alias: str, event_queue: EventQueue) -> None:
    events = write_events(db_alias, event_queue, 25)
    with OutboxRelay(using=db_alias, batch_size=10) as relay:
        assert relay.run(once=True) == 25
    bodies = event_queue.take_until(25)
    assert bodies == [event.event_data for event in events]  # same wire body, same order
    assert pending(db_alias) == []
    with OutboxRelay(using=db_alias) as relay:
        assert relay.run(once=True) == 0  # sent rows are not published again
    assert event_queue.take() == []


def test_crash_between_publish_and_mark_loses_nothing(
    db_alias: str, event_queue: EventQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    (event,) = write_events(db_alias, event_queue, 1)

    def crash(self: OutboxRelay, ids: list[int]) -> None:
        raise SimulatedCrash

    with monkeypatch.context() as patch, OutboxRelay(using=db_alias) as relay:
        patch.setattr(OutboxRelay, "_mark_sent", crash)
        with pytest.raises(SimulatedCrash):
            relay.relay_batch()
    assert [b["uuid_string"] for b in event_queue.take_until(1)] == [event.uuid_string]
    assert pending(db_alias) == [event.uuid_string]  # published, but not marked

    connections[db_alias].close()  # a new process: new connection, new relay
    with OutboxRelay(using=db_alias) as relay:
        assert relay.run(once=True) == 1
    assert [b["uuid_string"] for b in event_queue.take_until(1)] == [event.uuid_string]
    assert pending(db_alias) == []


def test_failure_mid_batch_marks_only_what_was_confirmed(
    db_alias: str, limited_queue: LimitedQueue
) -> None:
    # The queue holds 3 messages and makes the broker refuse (nack) the rest.
    events = write_events(db_alias, limited_queue, 5)
    with OutboxRelay(using=db_alias) as relay:
        with pytest.raises(BatchPublishError) as info:
            relay.relay_batch()
        assert [e.uuid_string for e, _ in info.value.failed] == [e.uuid_string for e in events[3:]]
        assert all("nacked" in str(error) for _, error in info.value.failed)
        assert pending(db_alias) == [e.uuid_string for e in events[3:]]
        assert [b["uuid_string"] for b in limited_queue.take()] == [
            e.uuid_string for e in events[:3]
        ]
        assert relay.relay_batch() == (2, 2)  # the refused rows, in order
    assert [b["uuid_string"] for b in limited_queue.take()] == [e.uuid_string for e in events[3:]]
    assert pending(db_alias) == []


def test_broker_outage_never_marks_unsent_rows(
    db_alias: str, event_queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    configure(timeout=0.5)
    events = write_events(db_alias, event_queue, 3)
    with OutboxRelay(DEAD_BROKER_URL, using=db_alias) as relay:
        with pytest.raises(BrokerError):
            relay.run(once=True)
        assert pending(db_alias) == [e.uuid_string for e in events]

        # Long-running: logs, backs off, retries, and stops when asked.
        stop = threading.Event()
        caplog.set_level(logging.DEBUG, logger="domain_event_broker.django.relay")

        def run_relay() -> None:
            try:
                relay.run(stop=stop, poll_interval=0.05)
            finally:
                connections.close_all()  # this thread's connections

        thread = threading.Thread(target=run_relay)
        thread.start()
        try:
            # One WARNING for the outage, then a DEBUG line per failed retry.
            wait_for(
                lambda: sum("Reconnecting failed" in r.getMessage() for r in caplog.records) >= 2,
                timeout=15,
                message="two logged retries",
            )
        finally:
            stop.set()
            thread.join(timeout=10)
        assert not thread.is_alive()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "Lost the connection to the broker" in warnings[0].getMessage()
    assert pending(db_alias) == [e.uuid_string for e in events]
    assert event_queue.take() == []


def test_two_relays_at_once_lose_nothing(db_alias: str, event_queue: EventQueue) -> None:
    events = write_events(db_alias, event_queue, 300)
    errors: list[BaseException] = []
    counts: list[int] = []
    start = threading.Barrier(2)

    def run_relay() -> None:
        try:
            with OutboxRelay(using=db_alias, batch_size=10) as relay:
                start.wait()
                counts.append(relay.run(once=True))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run_relay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert pending(db_alias) == []
    received = event_queue.take_until(sum(counts))
    uuids = [b["uuid_string"] for b in received]
    assert set(uuids) == {e.uuid_string for e in events}  # nothing lost
    duplicates = len(uuids) - len(set(uuids))
    # Row locks: each relay skips the other's batch. SQLite: the relays take
    # turns with the database's write lock, each reading what is left.
    assert duplicates == 0
    print(f"{db_alias}: 300 events, relays published {counts}, {duplicates} duplicate(s)")


def test_disabled_broker_marks_without_publishing(db_alias: str, event_queue: EventQueue) -> None:
    write_events(db_alias, event_queue, 2)
    with OutboxRelay(None, using=db_alias) as relay:
        assert relay.run(once=True) == 2
    assert pending(db_alias) == []
    assert event_queue.take() == []


def test_prune_deletes_only_old_sent_rows(db_alias: str) -> None:
    now = timezone.now()
    rows = OutboxEvent.objects.using(db_alias)
    for name, sent_at in [("old", now - timedelta(days=10)), ("recent", now), ("pending", None)]:
        rows.create(routing_key=f"test.{name}", uuid_string=name, body="{}", sent_at=sent_at)
    rows.filter(uuid_string="pending").update(created_at=now - timedelta(days=30))
    assert prune_sent_events(timedelta(days=7), using=db_alias) == 1
    assert sorted(rows.values_list("uuid_string", flat=True)) == ["pending", "recent"]
    with pytest.raises(ValueError, match="negative"):
        prune_sent_events(timedelta(days=-1), using=db_alias)


@pytest.mark.parametrize("batch_size", [0, 901, "10", True])
def test_relay_rejects_bad_options(batch_size: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        OutboxRelay(batch_size=batch_size)


def test_relay_rejects_unknown_database() -> None:
    with pytest.raises(ValueError, match="no database"):
        OutboxRelay(using="nope")
