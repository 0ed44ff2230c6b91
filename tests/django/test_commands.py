"""The relay_domain_events and prune_domain_events management commands."""

from __future__ import annotations

import math
import signal
import subprocess
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_event_broker import BatchPublishError, configure
from domain_event_broker.django.models import OutboxEvent
from domain_event_broker.django.outbox import prune_sent_events, publish_via_outbox
from domain_event_broker.django.relay import OutboxRelay

from ..helpers import wait_for
from .support import DEAD_BROKER_URL, EventQueue, LimitedQueue, manage_command

#: Deadline for a relay subprocess to exit after SIGTERM (seconds).
EXIT_DEADLINE = 15


def pending_count(db_alias: str) -> int:
    return OutboxEvent.objects.using(db_alias).filter(sent_at__isnull=True).count()


def write_events(db_alias: str, queue: EventQueue, count: int) -> list[str]:
    with transaction.atomic(using=db_alias):
        return [
            publish_via_outbox(queue.key(), {"n": n}, using=db_alias).uuid_string
            for n in range(count)
        ]


def test_once_relays_pending_events(db_alias: str, event_queue: EventQueue) -> None:
    uuids = write_events(db_alias, event_queue, 3)
    out = StringIO()
    call_command("relay_domain_events", "--once", "--database", db_alias, stdout=out)
    assert out.getvalue().strip() == "Relayed 3 domain event(s)"
    assert [b["uuid_string"] for b in event_queue.take_until(3)] == uuids
    assert pending_count(db_alias) == 0


def test_once_fails_and_keeps_rows_when_the_broker_is_down(
    db_alias: str, event_queue: EventQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", DEAD_BROKER_URL)
    configure(timeout=0.5)
    write_events(db_alias, event_queue, 2)
    with pytest.raises(CommandError, match="relaying the outbox failed"):
        call_command("relay_domain_events", "--once", "--database", db_alias)
    assert pending_count(db_alias) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--once", "--batch-size", "0"], "batch_size"),
        (["--once", "--database", "nope"], "no database 'nope'"),
        (["--list-failed", "--database", "nope"], "no database 'nope'"),
        (["--retry-failed", "--database", "nope"], "no database 'nope'"),
        (["--retry-failed", "3", "--database", "nope"], "no database 'nope'"),
        (["--database", "nope"], "no database 'nope'"),
        (["--once", "--max-message-size", "0"], "max-message-size"),
        (["--retry-failed", "99999999999999999999999"], "not a row id"),
        (["--retry-failed", "0"], "not a row id"),
        (["--retry-failed", "x"], "not a row id"),
    ],
)
def test_bad_options_are_command_errors(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("relay_domain_events", *args, stdout=StringIO())


def test_prune_with_an_unknown_database_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="no database 'nope'"):
        call_command("prune_domain_events", "--database", "nope", stdout=StringIO())


def test_once_in_a_subprocess(
    db_alias: str, event_queue: EventQueue, relay_env: dict[str, str]
) -> None:
    write_events(db_alias, event_queue, 4)
    result = subprocess.run(
        manage_command("relay_domain_events", "--once", "--database", db_alias),
        env=relay_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Relayed 4 domain event(s)"
    assert len(event_queue.take_until(4)) == 4
    assert pending_count(db_alias) == 0


def test_long_running_relay_stops_on_sigterm(
    db_alias: str, event_queue: EventQueue, relay_env: dict[str, str], tmp_path: Path
) -> None:
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            manage_command("relay_domain_events", "--database", db_alias, "--interval", "0.1"),
            env=relay_env,
            stdout=out,
            stderr=err,
        )
    try:
        wait_for(lambda: "Relaying the outbox" in stdout.read_text(), message="relay started")
        # Events written while it runs are relayed without a restart.
        for _ in range(2):
            uuids = write_events(db_alias, event_queue, 3)
            received = event_queue.take_until(3)
            assert [b["uuid_string"] for b in received] == uuids
            wait_for(lambda: pending_count(db_alias) == 0, message="rows marked sent")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_DEADLINE) == 0, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Stopped after relaying 6 domain event(s)" in stdout.read_text()


def test_sigterm_during_a_broker_outage(
    db_alias: str, event_queue: EventQueue, relay_env: dict[str, str], tmp_path: Path
) -> None:
    write_events(db_alias, event_queue, 2)
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen(
            manage_command("relay_domain_events", "--database", db_alias, "--timeout", "0.5"),
            env={**relay_env, "DOMAIN_EVENT_BROKER": DEAD_BROKER_URL},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(
            lambda: "Lost the connection to the broker" in stderr.read_text(),
            timeout=30,
            message="the outage logged",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_DEADLINE) == 0, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert pending_count(db_alias) == 2  # nothing marked sent
    assert event_queue.take() == []


def test_prune_command(db_alias: str) -> None:
    rows = OutboxEvent.objects.using(db_alias)
    old = timezone.now() - timedelta(days=3)
    rows.create(routing_key="test.old", uuid_string="old", body="{}", sent_at=old)
    rows.create(routing_key="test.pending", uuid_string="pending", body="{}")
    out = StringIO()
    call_command("prune_domain_events", "--days", "2", "--database", db_alias, stdout=out)
    assert out.getvalue().strip() == "Deleted 1 sent domain event(s) older than 2 day(s)"
    assert list(rows.values_list("uuid_string", flat=True)) == ["pending"]
    with pytest.raises(CommandError, match="negative"):
        call_command("prune_domain_events", "--days", "-1", "--database", db_alias)


@pytest.mark.django_db(transaction=True, databases=["default"])
@settings(max_examples=60, deadline=None)
@given(
    days=st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.sampled_from(["inf", "-inf", "nan", "1e10", "1e308", "999999999", "1000000000", "x", ""])
)
def test_prune_days_are_a_number_or_a_clear_error(days: str) -> None:
    sent = timezone.now() - timedelta(days=10)
    OutboxEvent.objects.create(routing_key="test.old", uuid_string="old", body="{}", sent_at=sent)
    out = StringIO()
    try:
        call_command("prune_domain_events", "--days", days, stdout=out)
    except CommandError as exc:
        assert "--days" in str(exc)
        assert OutboxEvent.objects.count() == 1  # nothing deleted
    else:
        value = float(days)
        assert math.isfinite(value)
        assert value >= 0
        lines = out.getvalue().splitlines()
        assert len(lines) == 1
        assert lines[0].endswith(f" sent domain event(s) older than {value:g} day(s)")
        if abs(value - 10) > 1:  # the row is 10 days old
            deleted = 1 if value < 10 else 0
            assert lines[0].startswith(f"Deleted {deleted} ")
            assert OutboxEvent.objects.count() == 1 - deleted
    OutboxEvent.objects.all().delete()


def test_prune_sent_events_takes_the_largest_timedelta(db_alias: str) -> None:
    OutboxEvent.objects.using(db_alias).create(
        routing_key="test.old", uuid_string="old", body="{}", sent_at=timezone.now()
    )
    assert prune_sent_events(timedelta.max, using=db_alias) == 0
    assert prune_sent_events(timedelta(days=999_999_999), using=db_alias) == 0
    assert OutboxEvent.objects.using(db_alias).count() == 1


def test_once_counts_what_it_relayed_before_a_failure(
    db_alias: str, limited_queue: LimitedQueue
) -> None:
    # The queue holds 3 messages and makes the broker refuse (nack) the rest.
    write_events(db_alias, limited_queue, 5)
    with OutboxRelay(using=db_alias) as relay:
        with pytest.raises(BatchPublishError):
            relay.run(once=True)
        assert relay.relayed == 3  # marked sent, and counted
    with pytest.raises(CommandError, match=r"failed after 0 domain event\(s\): publishing failed"):
        call_command("relay_domain_events", "--once", "--database", db_alias)
    assert pending_count(db_alias) == 2
