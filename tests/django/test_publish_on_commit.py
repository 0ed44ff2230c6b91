"""publish_on_commit against the real broker and real databases."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from django.db import transaction

from domain_event_broker import ConfigurationError, DomainEvent, UnroutableError, configure
from domain_event_broker.django import publish_on_commit

from ..faults.proxy import TcpProxy
from ..helpers import wait_for
from .support import DEAD_BROKER_URL, EventQueue


class RollbackError(Exception):
    pass


def test_no_transaction_publishes_at_once(db_alias: str, event_queue: EventQueue) -> None:
    event = publish_on_commit(event_queue.key(), {"n": 1}, using=db_alias)
    assert isinstance(event, DomainEvent)
    (body,) = event_queue.take_until(1)
    assert body["uuid_string"] == event.uuid_string
    assert body["data"] == {"n": 1}


def test_publishes_after_commit_only(db_alias: str, event_queue: EventQueue) -> None:
    with transaction.atomic(using=db_alias):
        event = publish_on_commit(event_queue.key(), {"n": 1}, "obj-1", using=db_alias)
        # Nothing may reach the broker before the commit; the broker confirms
        # each publish, so "not yet" is a synchronous fact here.
        assert event_queue.take() == []
    (body,) = event_queue.take_until(1)
    assert body == event.event_data


def test_rollback_publishes_nothing(db_alias: str, event_queue: EventQueue) -> None:
    with pytest.raises(RollbackError), transaction.atomic(using=db_alias):
        publish_on_commit(event_queue.key("rolled_back"), {}, using=db_alias)
        raise RollbackError
    # A later transaction must not publish it either; the marker event proves
    # that everything published before it has arrived.
    with transaction.atomic(using=db_alias):
        marker = publish_on_commit(event_queue.key("marker"), {}, using=db_alias)
    bodies = event_queue.take_until(1)
    assert [b["uuid_string"] for b in bodies] == [marker.uuid_string]


def test_nested_blocks_wait_for_the_outermost(db_alias: str, event_queue: EventQueue) -> None:
    with transaction.atomic(using=db_alias):
        with transaction.atomic(using=db_alias):
            inner = publish_on_commit(event_queue.key("inner"), {}, using=db_alias)
        assert event_queue.take() == []  # the savepoint was released, not committed
        outer = publish_on_commit(event_queue.key("outer"), {}, using=db_alias)
        assert event_queue.take() == []
    bodies = event_queue.take_until(2)
    assert [b["uuid_string"] for b in bodies] == [inner.uuid_string, outer.uuid_string]


def test_savepoint_rollback_drops_only_its_events(db_alias: str, event_queue: EventQueue) -> None:
    with transaction.atomic(using=db_alias):
        kept = publish_on_commit(event_queue.key("kept"), {}, using=db_alias)
        with pytest.raises(RollbackError), transaction.atomic(using=db_alias):
            publish_on_commit(event_queue.key("dropped"), {}, using=db_alias)
            raise RollbackError
        after = publish_on_commit(event_queue.key("after"), {}, using=db_alias)
    bodies = event_queue.take_until(2)
    assert [b["uuid_string"] for b in bodies] == [kept.uuid_string, after.uuid_string]
    assert event_queue.take() == []


def test_data_is_captured_when_called(db_alias: str, event_queue: EventQueue) -> None:
    data = {"state": "before"}
    with transaction.atomic(using=db_alias):
        publish_on_commit(event_queue.key(), data, using=db_alias)
        data["state"] = "changed after the call"
    (body,) = event_queue.take_until(1)
    assert body["data"] == {"state": "before"}


def test_failure_after_commit_is_logged_not_raised(
    db_alias: str, event_queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    configure(timeout=1.0)
    caplog.set_level(logging.ERROR, logger="domain_event_broker.django")
    uuid_string = str(uuid.uuid4())
    with transaction.atomic(using=db_alias):
        publish_on_commit(
            "test.lost",
            {},
            uuid_string=uuid_string,
            connection_settings=DEAD_BROKER_URL,
            using=db_alias,
        )
    (record,) = [r for r in caplog.records if r.name == "domain_event_broker.django.transaction"]
    assert record.levelno == logging.ERROR
    assert "test.lost" in record.getMessage()
    assert uuid_string in record.getMessage()
    assert record.exc_info is not None


def test_a_dead_broker_holds_the_commit_up_once_not_once_per_event(
    db_alias: str, event_queue: EventQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23, item 20: one deadline bounds a transaction's events (10
    events x 1 s held the commit up for 10 s)."""
    configure(timeout=1.0)
    caplog.set_level(logging.ERROR, logger="domain_event_broker.django")
    started = time.monotonic()
    with transaction.atomic(using=db_alias):
        lost = [
            publish_on_commit(
                "test.lost", {"n": n}, connection_settings=DEAD_BROKER_URL, using=db_alias
            )
            for n in range(10)
        ]
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 1.0, elapsed
    records = [r for r in caplog.records if r.name == "domain_event_broker.django.transaction"]
    assert len(records) == len(lost)
    assert all(e.uuid_string in r.getMessage() for e, r in zip(lost, records, strict=True))
    for record in records:
        assert "lost" in record.getMessage()
        assert "may or may not" not in record.getMessage()  # never sent: certainly lost
    # The next transaction has a deadline of its own.
    with transaction.atomic(using=db_alias):
        kept = publish_on_commit(event_queue.key("kept"), {}, using=db_alias)
    assert [b["uuid_string"] for b in event_queue.take_until(1)] == [kept.uuid_string]


def test_an_event_sent_and_not_confirmed_is_not_logged_as_lost(
    db_alias: str, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23, item 19: an event that was sent, then no confirm came (here:
    the network goes silent after the publish), may have reached the broker;
    the log line says so instead of "the event is lost"."""
    configure(timeout=2.0)
    caplog.set_level(logging.ERROR, logger="domain_event_broker.django")
    with TcpProxy.for_url(broker_url) as proxy:
        url = proxy.url(broker_url, heartbeat="1")  # a silent peer is noticed in ~2 s
        publish_on_commit("test.warm", {}, connection_settings=url, using=db_alias)
        proxy.freeze()  # nothing goes through any more, nothing is closed
        proxy.refuse()  # and no new connection gets through
        with transaction.atomic(using=db_alias):
            event = publish_on_commit("test.maybe", {}, connection_settings=url, using=db_alias)
    (record,) = [r for r in caplog.records if r.name == "domain_event_broker.django.transaction"]
    assert event.uuid_string in record.getMessage()
    assert "may or may not have reached the broker" in record.getMessage()
    assert "is lost" not in record.getMessage()
    assert record.exc_info is not None
    assert getattr(record.exc_info[1], "maybe_delivered", None) is True


def test_bad_input_raises_before_the_commit(db_alias: str) -> None:
    with transaction.atomic(using=db_alias):
        with pytest.raises(TypeError):
            publish_on_commit("test.bad", {"not json": object()}, using=db_alias)
        with pytest.raises(ValueError, match="routing_key"):
            publish_on_commit("", {}, using=db_alias)
        with pytest.raises(ConfigurationError):
            publish_on_commit("test.bad", {}, connection_settings="http://x", using=db_alias)


def test_disabled_broker_sends_nothing(db_alias: str, event_queue: EventQueue) -> None:
    with transaction.atomic(using=db_alias):
        publish_on_commit(event_queue.key("none"), {}, connection_settings=None, using=db_alias)
        marker = publish_on_commit(event_queue.key("marker"), {}, using=db_alias)
    bodies = wait_for(event_queue.take, message="the marker event")
    assert [b["uuid_string"] for b in bodies] == [marker.uuid_string]


# -- require_route, as publish_domain_event's ------------------------------------------


def _after_commit_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "domain_event_broker.django.transaction"]


def test_require_route_logs_an_unroutable_event_after_the_commit(
    db_alias: str, event_queue: EventQueue, own_vhost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="domain_event_broker.django")
    # Unroutable in a virtual host of its own: on the shared one a queue may bind "#".
    unbound = f"djangounbound{uuid.uuid4().hex}.created"
    nowhere = {"connection_settings": own_vhost_url, "using": db_alias}
    with transaction.atomic(using=db_alias):
        publish_on_commit(unbound, {}, **nowhere)  # the default: not required
        lost = publish_on_commit(unbound, {}, require_route=True, **nowhere)
        routed = publish_on_commit(event_queue.key(), {}, require_route=True, using=db_alias)
    (record,) = _after_commit_errors(caplog)
    assert lost.uuid_string in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], UnroutableError)
    (body,) = event_queue.take_until(1)
    assert body["uuid_string"] == routed.uuid_string


def test_require_route_follows_the_configured_default(
    db_alias: str, own_vhost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="domain_event_broker.django")
    unbound = f"djangounbound{uuid.uuid4().hex}.created"
    nowhere = {"connection_settings": own_vhost_url, "using": db_alias}
    configure(require_route=True)
    with transaction.atomic(using=db_alias):
        publish_on_commit(unbound, {}, require_route=False, **nowhere)  # the argument wins
        lost = publish_on_commit(unbound, {}, **nowhere)
    (record,) = _after_commit_errors(caplog)
    assert lost.uuid_string in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], UnroutableError)


def test_require_route_must_be_a_bool_when_called(db_alias: str) -> None:
    with transaction.atomic(using=db_alias), pytest.raises(TypeError, match="require_route"):
        publish_on_commit("test.bad", {}, require_route="yes", using=db_alias)  # type: ignore[arg-type]
