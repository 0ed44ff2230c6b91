"""The outbox relay in batches: after a lost connection, order, and rows it cannot publish."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import BatchPublishError, BrokerUnavailableError, DomainEvent
from domain_event_broker.django.models import OutboxEvent
from domain_event_broker.django.outbox import (
    failed_events,
    publish_via_outbox,
    retry_failed_events,
)
from domain_event_broker.django.relay import OutboxRelay

from ..faults.proxy import TcpProxy
from ..helpers import BROKER_URL, queue_size, wait_for
from .support import EventQueue, manage_command

#: Bodies that are no domain event, as a bug or a hand-made insert could leave them.
BAD_BODIES = [
    "not json",
    "[1, 2]",
    '{"routing_key": ""}',
    '{"routing_key": 5}',
    "",
    '{"routing_key": "a.b", "data": NaN}',  # not strict JSON: other languages refuse it
    '{"routing_key": "a.b", "timestamp": "yesterday"}',  # the subscriber would refuse it
]


def pending(db_alias: str) -> list[str]:
    return list(
        OutboxEvent.objects.using(db_alias)
        .filter(sent_at__isnull=True, failed_at__isnull=True)
        .order_by("id")
        .values_list("uuid_string", flat=True)
    )


def write_events(db_alias: str, queue: EventQueue, count: int) -> list[DomainEvent]:
    with transaction.atomic(using=db_alias):
        return [publish_via_outbox(queue.key(), {"n": n}, using=db_alias) for n in range(count)]


def write_bad_row(db_alias: str, body: str = "not json") -> int:
    row = OutboxEvent.objects.using(db_alias).create(
        routing_key="bad.row", uuid_string="bad-row", body=body
    )
    return int(row.pk)


def first_occurrences(uuids: list[str]) -> list[str]:
    seen: set[str] = set()
    return [u for u in uuids if not (u in seen or seen.add(u))]  # type: ignore[func-returns-value]


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_url(broker_url) as tcp_proxy:
        yield tcp_proxy


# -- batches and broker failures ------------------------------------------------------


def test_one_relay_keeps_the_insert_order_across_batches(
    db_alias: str, event_queue: EventQueue
) -> None:
    events = write_events(db_alias, event_queue, 1200)
    with OutboxRelay(using=db_alias, batch_size=500) as relay:
        assert relay.relay_batch() == (500, 500)
        assert relay.run(once=True) == 700
    received = event_queue.take_until(1200)
    assert [b["uuid_string"] for b in received] == [e.uuid_string for e in events]
    assert pending(db_alias) == []


def test_lost_connection_mid_run_loses_nothing_and_keeps_the_order(
    db_alias: str, event_queue: EventQueue, proxy: TcpProxy
) -> None:
    events = write_events(db_alias, event_queue, 3000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run_relay() -> None:
        try:
            with OutboxRelay(proxy.url(BROKER_URL), using=db_alias, batch_size=100) as relay:
                relay.run(stop=stop, poll_interval=0.05)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run_relay)
    thread.start()
    try:
        wait_for(lambda: (queue_size(event_queue.name) or 0) >= 200, message="some relayed")
        assert proxy.cut() >= 1  # the relay's own connection; the shared broker is untouched
        wait_for(lambda: pending(db_alias) == [], timeout=60, message="every row sent")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert errors == []
    assert proxy.accepted >= 2  # it reconnected
    uuids = [b["uuid_string"] for b in event_queue.take_until(3000)]
    uuids += [b["uuid_string"] for b in event_queue.take()]  # duplicates counted above
    assert set(uuids) == {e.uuid_string for e in events}
    assert first_occurrences(uuids) == [e.uuid_string for e in events]


# The deadline is the fast paths' (see tests/test_publish_batch.py).
@pytest.mark.fast_paths
def test_rows_stay_pending_until_the_broker_confirmed_them(
    db_alias: str, event_queue: EventQueue, proxy: TcpProxy
) -> None:
    events = write_events(db_alias, event_queue, 5)
    with OutboxRelay(proxy.url(BROKER_URL), using=db_alias, timeout=1) as relay:
        assert relay.relay_batch() == (5, 5)
        more = write_events(db_alias, event_queue, 5)
        proxy.freeze()  # nothing goes through, nothing is confirmed
        with pytest.raises(BatchPublishError) as info:
            relay.relay_batch()
        assert all(isinstance(cause, BrokerUnavailableError) for _, cause in info.value.failed)
        assert pending(db_alias) == [e.uuid_string for e in more]
        assert relay.relay_batch() == (5, 5)  # on a new connection
    received = [b["uuid_string"] for b in event_queue.take_until(10)]
    assert first_occurrences(received) == [e.uuid_string for e in events + more]
    assert pending(db_alias) == []


# -- rows that cannot be published ------------------------------------------------------------


@pytest.mark.parametrize("body", BAD_BODIES)
def test_a_bad_row_is_set_aside_and_the_rows_behind_it_go_on(
    db_alias: str, event_queue: EventQueue, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = write_bad_row(db_alias, body)
    events = write_events(db_alias, event_queue, 2)
    with OutboxRelay(using=db_alias, batch_size=1) as relay:
        assert relay.run(once=True) == 2
        assert relay.set_aside == 1
    assert [b["uuid_string"] for b in event_queue.take_until(2)] == [e.uuid_string for e in events]
    row = OutboxEvent.objects.using(db_alias).get(pk=bad)
    assert row.sent_at is None
    assert row.failed_at is not None
    assert row.failure_reason
    assert str(row).endswith(f"(failed {row.failed_at:%Y-%m-%d %H:%M:%S})")
    assert [r.pk for r in failed_events(using=db_alias)] == [bad]
    assert any(
        r.levelname == "ERROR" and f"Outbox row {bad} " in r.getMessage() for r in caplog.records
    )
    with OutboxRelay(using=db_alias) as relay:
        assert relay.run(once=True) == 0  # not read again
        assert relay.set_aside == 0


def test_a_fixed_row_is_retried_on_request(db_alias: str, event_queue: EventQueue) -> None:
    bad = write_bad_row(db_alias)
    other = write_bad_row(db_alias, "[]")
    with OutboxRelay(using=db_alias) as relay:
        relay.run(once=True)
    fixed = DomainEvent(event_queue.key(), {"fixed": True})
    OutboxEvent.objects.using(db_alias).filter(pk=bad).update(body=fixed.to_json())
    assert retry_failed_events([bad], using=db_alias) == 1
    assert [r.pk for r in failed_events(using=db_alias)] == [other]
    with OutboxRelay(using=db_alias) as relay:
        assert relay.run(once=True) == 1
    assert [b["uuid_string"] for b in event_queue.take_until(1)] == [fixed.uuid_string]
    assert retry_failed_events(using=db_alias) == 1  # all that are left
    with pytest.raises(TypeError):
        retry_failed_events(["1"], using=db_alias)  # type: ignore[list-item]


def test_once_says_so_in_its_summary_and_exit_status(
    db_alias: str, event_queue: EventQueue, relay_env: dict[str, str]
) -> None:
    bad = write_bad_row(db_alias)
    write_events(db_alias, event_queue, 2)
    result = subprocess.run(
        manage_command(
            "relay_domain_events", "--once", "--batch-size", "1", "--database", db_alias
        ),
        env=relay_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == (
        "Relayed 2 domain event(s); 1 row(s) could not be published and were set aside as failed"
    )
    assert "--list-failed" in result.stderr
    assert len(event_queue.take_until(2)) == 2

    out = StringIO()
    call_command("relay_domain_events", "--list-failed", "--database", db_alias, stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{bad}\tbad.row\tbad-row\t")
    assert "MalformedEventError" in lines[0]
    assert lines[-1] == "1 row(s) set aside as failed"

    out = StringIO()
    call_command("relay_domain_events", "--retry-failed", "--database", db_alias, stdout=out)
    assert out.getvalue().strip() == "1 failed row(s) made pending again"
    with pytest.raises(CommandError, match="set aside") as info:
        call_command("relay_domain_events", "--once", "--database", db_alias, stdout=StringIO())
    assert info.value.returncode == 2


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(bodies=st.lists(st.text(max_size=30) | st.sampled_from(BAD_BODIES), max_size=5))
@pytest.mark.django_db(transaction=True, databases=["default"])
def test_whatever_the_rows_hold_the_outbox_never_stalls(
    event_queue: EventQueue, bodies: list[str]
) -> None:
    for body in bodies:
        write_bad_row("default", body)
    (event,) = write_events("default", event_queue, 1)
    with OutboxRelay(using="default", batch_size=1) as relay:
        relay.run(once=True)
    assert pending("default") == []
    assert event.uuid_string in [b["uuid_string"] for b in event_queue.take_until(1)]
    OutboxEvent.objects.using("default").all().delete()


def test_long_running_relay_says_so_when_it_stops(
    db_alias: str, event_queue: EventQueue, relay_env: dict[str, str], tmp_path: Path
) -> None:
    write_bad_row(db_alias)
    uuids = [e.uuid_string for e in write_events(db_alias, event_queue, 2)]
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            manage_command("relay_domain_events", "--database", db_alias, "--interval", "0.1"),
            env=relay_env,
            stdout=out,
            stderr=err,
        )
    try:
        assert [b["uuid_string"] for b in event_queue.take_until(2)] == uuids
        wait_for(lambda: "set aside as failed" in stderr.read_text(), message="the ERROR line")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert stdout.read_text().splitlines()[-1] == (
        "Stopped after relaying 2 domain event(s); 1 row(s) could not be published and were "
        "set aside as failed"
    )


def test_a_row_set_aside_again_counts_once(db_alias: str, broker_url: str) -> None:
    for body in BAD_BODIES[:3]:
        write_bad_row(db_alias, body)
    with OutboxRelay(using=db_alias, batch_size=2) as relay:
        relay.run(once=True)
        assert relay.set_aside == 3
        assert retry_failed_events(using=db_alias) == 3  # retried without a fix
        relay.run(once=True)
        assert relay.set_aside == 3  # rows, not times
    assert len(failed_events(using=db_alias)) == 3


# -- which side failed -------------------------------------------------------------------


def test_a_database_failure_is_logged_as_one(
    db_alias: str, event_queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="domain_event_broker")
    events = write_events(db_alias, event_queue, 2)
    table = OutboxEvent._meta.db_table
    quote = connections[db_alias].ops.quote_name

    def rename(old: str, new: str) -> None:
        with connections[db_alias].cursor() as cursor:
            cursor.execute(f"ALTER TABLE {quote(old)} RENAME TO {quote(new)}")

    def lines(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("domain_event_broker") and r.levelno == level
        ]

    rename(table, f"{table}_away")  # as if the migration had not run
    stop = threading.Event()

    def run_relay() -> None:
        try:
            with OutboxRelay(using=db_alias) as relay:
                relay.run(stop=stop, poll_interval=0.05)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run_relay)
    thread.start()
    try:
        try:
            wait_for(lambda: lines(logging.WARNING), message="a WARNING")
        finally:
            rename(f"{table}_away", table)
        received = event_queue.take_until(2)
        wait_for(lambda: any("answers again" in m for m in lines(logging.INFO)), message="INFO")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert [b["uuid_string"] for b in received] == [e.uuid_string for e in events]
    (warning,) = lines(logging.WARNING)
    assert warning.startswith(f"The outbox's database {db_alias!r} failed (")
    assert "nothing more is published until it answers" in warning
    logged = " ".join(lines(logging.INFO) + lines(logging.WARNING))
    assert "the broker" not in logged
    assert "Reconnected" not in logged
