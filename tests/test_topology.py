"""Queue types, takeover, durable routes and the quorum delivery limit."""

from __future__ import annotations

import logging
import time
from typing import Any

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain_event_broker import (
    ConfigurationError,
    Publisher,
    Retry,
    Subscriber,
    configure,
    migrate_queue_type,
)
from domain_event_broker._amqp import config as _config
from domain_event_broker._amqp import names as _names
from domain_event_broker._amqp.failures import denied_feature, translate_pika_error
from domain_event_broker._subscribing import topology as _topology
from domain_event_broker._subscribing.registration import Registration

from .conftest import Names
from .helpers import get_messages, queue_size, raw_connection, wait_for


def _noop(event: object) -> None:
    return None


# -- validation (no broker) -------------------------------------------------------------


@given(st.one_of(st.text(), st.integers(), st.booleans(), st.binary()))
def test_unknown_queue_types_are_refused(value: Any) -> None:
    if value in ("classic", "quorum", ""):
        return
    with pytest.raises(ConfigurationError):
        Registration(handler=_noop, name="x", binding_keys=("k",), queue_type=value)
    with pytest.raises(ConfigurationError):
        configure(queue_type=value)


@pytest.mark.parametrize(
    "options", [{"durable": False}, {"exclusive": True}, {"auto_delete": True}]
)
def test_quorum_queues_must_be_durable_and_shared(options: dict[str, bool]) -> None:
    with pytest.raises(ValueError, match="quorum"):
        Registration(handler=_noop, name="x", binding_keys=("k",), queue_type="quorum", **options)


def test_default_queue_type_environment_beats_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    registration = Registration(handler=_noop, name="x", binding_keys=("k",))
    assert _topology.requested_queue_type(registration) is None
    configure(queue_type="classic")
    assert _topology.requested_queue_type(registration) == "classic"
    monkeypatch.setenv(_config.QUEUE_TYPE_VARIABLE, "quorum")
    assert _topology.requested_queue_type(registration) == "quorum"
    explicit = Registration(handler=_noop, name="x", binding_keys=("k",), queue_type="classic")
    assert _topology.requested_queue_type(explicit) == "classic"
    monkeypatch.setenv(_config.QUEUE_TYPE_VARIABLE, "mirrored")
    with pytest.raises(ConfigurationError, match=_config.QUEUE_TYPE_VARIABLE):
        _topology.requested_queue_type(registration)


@given(
    name=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1),
    milliseconds=st.integers(min_value=0, max_value=30 * 24 * 3600 * 1000),
    queue_type=st.sampled_from(_names.QUEUE_TYPES),
)
def test_new_names_never_collide_with_302s(name: str, milliseconds: int, queue_type: str) -> None:
    new = {
        _names.durable_retry_exchange(name),
        _names.durable_dead_letter_exchange(name),
        _names.typed_delay_queue(name, milliseconds, queue_type),
    }
    old = {
        _names.retry_exchange(name),
        _names.dead_letter_exchange(name),
        _names.dead_letter_queue(name),
        _names.delay_queue(name, milliseconds),
    }
    assert not new & old
    assert _names.typed_delay_queue(name, milliseconds, queue_type).startswith(
        _names.delay_queue_prefix(name)
    )
    arguments = _names.typed_delay_queue_arguments(name, milliseconds, queue_type)
    assert arguments["x-dead-letter-exchange"] == _names.durable_retry_exchange(name)
    assert (arguments.get("x-dead-letter-strategy") == "at-least-once") == (queue_type == "quorum")


# -- on the broker -------------------------------------------------------------------


def _declared_type(channel: Any, queue: str, arguments: dict[str, object]) -> str:
    """Which type the broker accepts ``queue`` as (with its other arguments)."""
    probe = channel.connection.channel()
    try:
        probe.queue_declare(queue, durable=True, arguments={**arguments, "x-queue-type": "classic"})
    except pika.exceptions.ChannelClosedByBroker:
        return "quorum"
    probe.close()
    return "classic"


@pytest.mark.parametrize("queue_type", [None, "classic", "quorum"])
def test_handler_queues_get_the_type(names: Names, channel: Any, queue_type: str | None) -> None:
    name = names.new("qtype")
    with Subscriber() as subscriber:
        subscriber.register(_noop, name, ["qtype.x"], dead_letter=True, queue_type=queue_type)
    expected = queue_type or "classic"  # the test broker's default
    inbox = _names.inbox_arguments(name, True, queue_type)
    inbox.pop("x-queue-type", None)
    assert _declared_type(channel, name, inbox) == expected
    assert _declared_type(channel, f"{name}-dl", {}) == expected


def test_queue_of_the_other_type_is_taken_over_with_a_warning(
    names: Names, channel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    name = names.new("takeover")
    # As 3.0.2 declared it (classic, its dead-letter exchange).
    channel.queue_declare(name, durable=True, arguments={"x-dead-letter-exchange": f"{name}-dlx"})
    caplog.set_level(logging.WARNING, logger="domain_event_broker")
    with Subscriber() as subscriber:
        subscriber.register(_noop, name, ["takeover.x"], dead_letter=True, queue_type="quorum")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("domain_event_broker")]
    assert any(
        f"Queue {name} exists as a classic queue" in message
        and f"domain-event-broker migrate {name} --queue-type quorum" in message
        for message in warnings
    ), warnings


def test_a_quorum_dead_letter_queue_of_4_1_is_taken_over_and_migrate_renews_it(
    names: Names, channel: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """4.1 declared a quorum ``-dl`` without a delivery limit (RabbitMQ 4's
    default of 20 applies); this version declares one. The old queue is taken
    over as it is, with a warning naming ``migrate``, which renews it, and a
    dead letter in it survives."""
    name = names.new("legacydl")
    dlq = f"{name}-dl"
    channel.queue_declare(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    caplog.set_level(logging.WARNING, logger="domain_event_broker")
    with Subscriber() as subscriber:
        subscriber.register(_noop, name, ["legacydl.x"], dead_letter=True, queue_type="quorum")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("domain_event_broker")]
    assert any(
        f"Queue {dlq} exists as a quorum queue with arguments this version no longer declares"
        in message
        and "x-delivery-limit" in message
        and f"domain-event-broker migrate {name} --queue-type quorum" in message
        for message in warnings
    ), warnings
    channel.basic_publish("", dlq, b"{}", pika.BasicProperties(delivery_mode=2))
    wait_for(lambda: queue_size(dlq) == 1, timeout=10, message="the dead letter")
    migrate_queue_type(name, "quorum", ["legacydl.x"])
    # Declared again with this version's arguments: the broker accepts them.
    channel.queue_declare(dlq, durable=True, arguments=_names.dead_letter_queue_arguments("quorum"))
    assert queue_size(dlq) == 1
    caplog.clear()
    with Subscriber() as subscriber:
        subscriber.register(_noop, name, ["legacydl.x"], dead_letter=True, queue_type="quorum")
    assert not [r for r in caplog.records if r.name.startswith("domain_event_broker")]


def test_retry_returns_whatever_its_routing_key(names: Names, channel: Any) -> None:
    """An event that reached the queue with a key no binding matches still retries."""
    name = names.new("anykey")
    seen: list[int] = []

    def retry_once(event: Any) -> None:
        seen.append(event.retries)
        if event.retries == 0:
            raise Retry(0.05)

    subscriber = Subscriber()
    subscriber.register(retry_once, name, ["anykey.bound"], max_retries=1)
    with Publisher() as publisher:
        # Straight into the queue through the default exchange.
        publisher.channel.basic_publish(  # type: ignore[union-attr]
            "", name, b'{"routing_key": "other.key", "data": {}}'
        )
    end = time.monotonic() + 20
    while seen != [0, 1] and time.monotonic() < end:
        subscriber.start_consuming(timeout=0.5)
    subscriber.close()
    assert seen == [0, 1]


def test_quorum_delivery_limit_dead_letters_with_a_reason(names: Names, broker_url: str) -> None:
    """Redelivered past the delivery limit, an event lands in -dl with the reason."""
    name = names.new("limit")
    with Subscriber() as subscriber:
        subscriber.register(_noop, name, ["limit.x"], dead_letter=True, queue_type="quorum")
    with Publisher() as publisher:
        publisher.publish('{"routing_key": "limit.x", "data": {}}', "limit.x")
    connection = raw_connection()
    try:
        channel = connection.channel()
        for _ in range(_names.QUORUM_DELIVERY_LIMIT + 5):
            method, _, _ = channel.basic_get(name)
            if method is None:
                break
            # basic.reject with requeue counts toward the delivery limit on
            # every version; from RabbitMQ 4.3 on, basic.nack with requeue no
            # longer does (it only raises x-acquired-count), so a nack loop
            # would never reach the limit there.
            channel.basic_reject(method.delivery_tag, requeue=True)
    finally:
        connection.close()
    wait_for(lambda: queue_size(f"{name}-dl") == 1, timeout=20, message="the dead letter")
    assert queue_size(name) == 0
    ((_, properties, _),) = get_messages(f"{name}-dl")
    deaths = properties.headers["x-death"]
    assert deaths[0]["reason"] == "delivery_limit"
    assert deaths[0]["routing-keys"] == ["limit.x"]


# -- deprecated features the broker denies ----------------------------------------------

#: What RabbitMQ 4.3 says when it denies transient non-exclusive queues.
_DENIED_TEXT = (
    "INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated.\n"
    "Its use is not permitted per the configuration (overriding the default, which is "
    'permitted):\n    "deprecated_features.permit.transient_nonexcl_queues = false"'
)


def test_a_denied_deprecated_feature_is_a_configuration_error() -> None:
    denied = pika.exceptions.ConnectionClosedByBroker(541, _DENIED_TEXT)
    assert denied_feature(denied) == "transient_nonexcl_queues"
    error = translate_pika_error(denied, "declaring")
    assert isinstance(error, ConfigurationError)
    assert "transient_nonexcl_queues" in str(error)
    # Other 541s and other closes are not.
    assert denied_feature(pika.exceptions.ConnectionClosedByBroker(541, "INTERNAL_ERROR")) is None
    assert denied_feature(pika.exceptions.ConnectionClosedByBroker(320, _DENIED_TEXT)) is None
    assert denied_feature(pika.exceptions.ChannelClosedByBroker(541, _DENIED_TEXT)) is None


def _broker_permits_transient_queues(name: str) -> bool:
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.queue_declare(name, durable=False)
        channel.queue_delete(name)
        return True
    except pika.exceptions.ConnectionClosedByBroker as exc:
        if denied_feature(exc) != "transient_nonexcl_queues":
            raise
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_non_durable_queue_refused_by_the_broker(names: Names) -> None:
    """RabbitMQ 4.3 denies transient non-exclusive queues by default: register()
    says so and how to fix it, rather than report an outage."""
    name = names.new("transient")
    if _broker_permits_transient_queues(name):
        pytest.skip("this broker permits transient non-exclusive queues (before 4.3)")
    with Subscriber() as subscriber:
        with pytest.raises(ConfigurationError, match="durable=True") as caught:
            subscriber.register(_noop, name, ["transient.x"], durable=False)
        assert "exclusive=True" in str(caught.value)
        assert isinstance(caught.value.__cause__, pika.exceptions.ConnectionClosedByBroker)
        # The subscriber goes on: the same handler, durable or exclusive, is declared.
        subscriber.register(_noop, name, ["transient.x"], durable=False, exclusive=True)
    assert queue_size(name) is None  # exclusive: gone with its connection
    with Subscriber() as subscriber:
        subscriber.register(_noop, name, ["transient.x"])
        assert queue_size(name) == 0
