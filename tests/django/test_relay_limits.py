"""Rows too large for the broker: set aside with the reason, never a stall or a storm.

RabbitMQ closes the channel when a message body is larger than its
``max_message_size`` (16 MiB by default on 4.x, 128 MiB on 3.x). The tests
that make the broker refuse one lower that limit at run time, through
``rabbitmqctl``, and put it back afterwards: they run on a private node only
(``DEB_TEST_RABBITMQ_NODE``, e.g. ``eval "$(scripts/cluster.sh env 4.0
pPORT)"``), or in CI, never against a broker other people use.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import DomainEvent
from domain_event_broker.django.models import OutboxEvent
from domain_event_broker.django.outbox import publish_via_outbox
from domain_event_broker.django.relay import OutboxRelay
from domain_event_broker.events import check_event

from ..faults.control import RabbitControl
from ..helpers import NODE_VARIABLE, rabbitmqctl_command
from .support import EventQueue, manage_command

#: The limit the broker is given for these tests (bytes).
LIMIT = 512 * 1024


def encoded_size(body: str) -> int:
    """The size of the message the relay would publish for an outbox ``body``."""
    return len(check_event(DomainEvent.from_json(body)).encode("utf-8"))


def write_sized(db_alias: str, queue: EventQueue, size: int) -> OutboxEvent:
    """An outbox row whose event is ``size`` bytes once encoded."""
    event = publish_via_outbox(queue.key("sized"), {"pad": ""}, using=db_alias)
    row: OutboxEvent = OutboxEvent.objects.using(db_alias).get(uuid_string=event.uuid_string)
    padding = size - encoded_size(row.body)
    assert padding >= 0
    row.body = DomainEvent(
        routing_key=event.routing_key,
        data={"pad": "x" * padding},
        uuid_string=event.uuid_string,
        timestamp=event.timestamp,
    ).to_json()
    row.save(update_fields=["body"])
    assert encoded_size(row.body) == size
    return row


def sent_ids(db_alias: str) -> set[int]:
    return set(
        OutboxEvent.objects.using(db_alias)
        .filter(sent_at__isnull=False)
        .values_list("id", flat=True)
    )


def failed_ids(db_alias: str) -> set[int]:
    return set(
        OutboxEvent.objects.using(db_alias)
        .filter(failed_at__isnull=False)
        .values_list("id", flat=True)
    )


# -- a limit given to the relay: checked before publishing ---------------------------


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    limit=st.integers(min_value=200, max_value=4000),
    offsets=st.lists(st.integers(min_value=-3, max_value=3), min_size=1, max_size=6),
)
@pytest.mark.django_db(transaction=True, databases=["default"])
def test_a_row_over_the_given_limit_is_set_aside_and_the_others_go_on(
    event_queue: EventQueue, limit: int, offsets: list[int]
) -> None:
    rows = [write_sized("default", event_queue, limit + offset) for offset in offsets]
    with OutboxRelay(using="default", max_message_size=limit, batch_size=2) as relay:
        fitting = [row for row in rows if encoded_size(row.body) <= limit]
        assert relay.run(once=True) == len(fitting)
        assert relay.set_aside == len(rows) - len(fitting)
    received = event_queue.take_until(len(fitting)) if fitting else []
    assert [b["uuid_string"] for b in received] == [row.uuid_string for row in fitting]
    assert failed_ids("default") == {row.pk for row in rows if row not in fitting}
    for row in OutboxEvent.objects.using("default").filter(failed_at__isnull=False):
        assert row.failure_reason.startswith("EventTooLarge: the event is ")
        assert f"at most {limit} (its max_message_size)" in row.failure_reason
    assert event_queue.take() == []  # nothing more, and nothing twice
    OutboxEvent.objects.using("default").all().delete()


def test_max_message_size_must_be_a_positive_int(db_alias: str) -> None:
    for wrong in (0, -1, True, 1.5, "1024"):
        with pytest.raises(ValueError, match="max_message_size"):
            OutboxRelay(using=db_alias, max_message_size=wrong)  # type: ignore[arg-type]


def test_the_command_takes_the_limit(
    db_alias: str, event_queue: EventQueue, relay_env: dict[str, str]
) -> None:
    small = write_sized(db_alias, event_queue, 300)
    large = write_sized(db_alias, event_queue, 2000)
    result = subprocess.run(
        manage_command(
            "relay_domain_events", "--once", "--database", db_alias, "--max-message-size", "1000"
        ),
        env=relay_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == (
        "Relayed 1 domain event(s); 1 row(s) could not be published and were set aside as failed"
    )
    assert [b["uuid_string"] for b in event_queue.take_until(1)] == [small.uuid_string]
    assert failed_ids(db_alias) == {large.pk}
    out = StringIO()
    call_command("relay_domain_events", "--list-failed", "--database", db_alias, stdout=out)
    assert "EventTooLarge" in out.getvalue()


# -- the broker refuses: the relay learns the limit -----------------------------------


@pytest.fixture
def small_broker_limit(broker_url: str) -> Iterator[int]:
    """Lower the broker's ``max_message_size`` to :data:`LIMIT`; put it back after."""
    if not os.environ.get(NODE_VARIABLE) and not os.environ.get("CI"):
        pytest.skip(
            f"changes the broker's max_message_size: needs a private node ({NODE_VARIABLE})"
        )
    control = RabbitControl(None, broker_url, rabbitmqctl_command())
    # 3.x reads the application's setting for each new channel; 4.x keeps
    # it in a persistent term, read for each message.
    put = (
        "application:set_env(rabbit, max_message_size, {0}), "
        "case persistent_term:get(max_message_size, undefined) of "
        "undefined -> ok; _ -> persistent_term:put(max_message_size, {0}) end"
    )
    old = control.eval("application:get_env(rabbit, max_message_size, 134217728).")
    control.eval(put.format(LIMIT) + ".")
    yield LIMIT
    control.eval(put.format(int(old)) + ".")


@pytest.mark.faults
def test_an_oversized_row_is_set_aside_and_the_others_go_out_once(
    db_alias: str,
    event_queue: EventQueue,
    small_broker_limit: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with transaction.atomic(using=db_alias):
        before = [write_sized(db_alias, event_queue, 200 + n) for n in range(5)]
        huge = write_sized(db_alias, event_queue, 2 * small_broker_limit)
        after = [write_sized(db_alias, event_queue, 200 + n) for n in range(5)]
        # Over the limit, larger than the large-event size: published alone, unless known.
        over = write_sized(db_alias, event_queue, small_broker_limit + 1)
    with OutboxRelay(using=db_alias, batch_size=500, timeout=10) as relay:
        assert relay.run(once=True) == 10
        assert relay.set_aside == 2
        assert relay.relayed == 10
    uuids = [b["uuid_string"] for b in event_queue.take_until(10)]
    assert uuids == [row.uuid_string for row in before + after]  # in order, once each
    assert event_queue.take() == []
    assert failed_ids(db_alias) == {huge.pk, over.pk}
    reason = OutboxEvent.objects.using(db_alias).get(pk=huge.pk).failure_reason
    assert reason == (
        f"EventTooLarge: the event is {2 * small_broker_limit} bytes; the broker accepts at "
        f"most {small_broker_limit} (its max_message_size). Make the event smaller, or "
        f"raise the broker's limit"
    )
    # Refused once by the broker; the second one was checked before publishing.
    closes = [
        r for r in caplog.records if "max size" in r.getMessage() and r.name == "pika.channel"
    ]
    assert len(closes) == 1
    assert not [
        r
        for r in caplog.records
        if r.name.startswith("domain_event_broker") and r.levelno == logging.WARNING
    ]


@pytest.mark.faults
def test_the_command_reports_what_it_relayed_past_an_oversized_row(
    db_alias: str,
    event_queue: EventQueue,
    small_broker_limit: int,
    relay_env: dict[str, str],
) -> None:
    rows = [write_sized(db_alias, event_queue, 300) for _ in range(3)]
    write_sized(db_alias, event_queue, 2 * small_broker_limit)
    rows += [write_sized(db_alias, event_queue, 300) for _ in range(2)]
    result = subprocess.run(
        manage_command("relay_domain_events", "--once", "--database", db_alias),
        env=relay_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == (
        "Relayed 5 domain event(s); 1 row(s) could not be published and were set aside as failed"
    )
    assert [b["uuid_string"] for b in event_queue.take_until(5)] == [r.uuid_string for r in rows]
    assert event_queue.take() == []
    assert sent_ids(db_alias) == {row.pk for row in rows}
