"""Everything a user passes in is checked once, before anything is sent or
declared: only TypeError, ValueError or the library's errors come out, never
a pika exception, never half-declared topology; what publishing accepts, the
subscriber accepts too."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import io
import json
import math
import os
import unittest.mock
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pika.adapters.blocking_connection import BlockingChannel

import domain_event_broker.events as events_module
from domain_event_broker import (
    ConfigurationError,
    DomainEvent,
    DomainEventBrokerError,
    Publisher,
    Subscriber,
    UnroutableError,
    configure,
    publish_domain_event,
)
from domain_event_broker._cli.prompt import AnswerReader, InteractivePrompt
from domain_event_broker._core import validate as _validate
from domain_event_broker.events import check_event

from .conftest import Names
from .helpers import raw_connection

ALLOWED = (TypeError, ValueError, DomainEventBrokerError)
NOTHING = {"connection_settings": None}


def deep(levels: int) -> Any:
    data: Any = "leaf"
    for _ in range(levels):
        data = [data]
    return data


@pytest.fixture
def publisher(broker_url: str) -> Iterator[Publisher]:
    with Publisher(broker_url, timeout=10) as publisher:
        yield publisher


def exists(kind: str, name: str) -> bool:
    connection = raw_connection()
    try:
        channel = connection.channel()
        if kind == "queue":
            channel.queue_declare(name, passive=True)
        else:
            channel.exchange_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if connection.is_open:
            connection.close()
    return True


# -- headers: what pika cannot encode is refused before connecting -------------------------------

BAD_HEADERS = [
    ({"price": 1.5}, TypeError),
    ({"big": 2**64}, ValueError),
    ({"small": -(2**63) - 1}, ValueError),
    ({1: "x"}, TypeError),
    ({"k" * 256: "x"}, ValueError),
    ({"é" * 128: "x"}, ValueError),  # 256 bytes in UTF-8
    ({"t": (1, 2)}, TypeError),
    ({"s": {1, 2}}, TypeError),
    ({"o": object()}, TypeError),
    ({"n": {"deeper": [1.0]}}, TypeError),
    ({"d": decimal.Decimal("NaN")}, ValueError),
    ({"d": decimal.Decimal("1.5E+20")}, ValueError),
    ({"when": datetime.datetime(1960, 1, 1)}, ValueError),
    ({"lone": "\ud800"}, ValueError),
    ({"huge": "x" * 70_000}, ValueError),  # beyond a frame: used to retry for 30 s
    ("not a mapping", TypeError),
]


@pytest.mark.parametrize(("headers", "error"), BAD_HEADERS)
def test_headers_pika_cannot_encode_are_refused_before_connecting(
    publisher: Publisher, headers: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        publisher.publish_event(DomainEvent("edges.nobody", {}), headers=headers)
    assert not isinstance(info.value, pika.exceptions.AMQPError)
    assert (
        publisher._sender is not None and publisher._sender.link.connection is None
    )  # nothing was sent, not even a connect
    properties = pika.BasicProperties(headers=headers)
    with pytest.raises(error):
        publisher.publish(b"{}", "edges.nobody", properties=properties)


def test_every_header_type_amqp_carries_is_sent(publisher: Publisher) -> None:
    headers = {
        "s": "text",
        "b": b"\x00bytes",
        "t": True,
        "i": -(2**63),
        "j": 2**63 - 1,
        "d": decimal.Decimal("-21474.83648"),
        "w": datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "n": None,
        "nested": {"list": [1, "two", {"x": None}]},
        "k" * 255: "longest key",
    }
    publisher.publish_event(DomainEvent("edges.nobody", {}), headers=headers)


def test_publish_refuses_a_body_that_is_not_str_or_bytes(publisher: Publisher) -> None:
    with pytest.raises(TypeError, match="message must be str or bytes"):
        publisher.publish(123, "edges.nobody")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        publisher.publish(None, "edges.nobody")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="properties"):
        publisher.publish(b"{}", "edges.nobody", properties={"headers": {}})  # type: ignore[arg-type]
    assert publisher._sender is not None and publisher._sender.link.connection is None


# -- event fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"uuid_string": 5}, TypeError),  # was pika's AssertionError
        ({"uuid_string": "u" * 256}, ValueError),  # the AMQP message_id is a short string
        ({"timestamp": "yesterday"}, TypeError),  # the subscriber dead-lettered it
        ({"timestamp": True}, TypeError),
        ({"timestamp": math.nan}, ValueError),
        ({"timestamp": math.inf}, ValueError),
        ({"timestamp": 10**400}, ValueError),
        ({"data": {"x": math.nan}}, ValueError),  # was sent as non-standard JSON
        ({"data": [math.inf]}, ValueError),
        ({"data": {1: "int key"}}, TypeError),  # json.dumps made it "1" silently
        ({"data": deep(1000)}, ValueError),  # was RecursionError
        ({"domain_object_id": math.nan}, ValueError),
    ],
)
def test_bad_event_fields_are_refused_before_sending(
    publisher: Publisher, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    arguments = {"routing_key": "edges.nobody", "data": {}, **kwargs}
    with pytest.raises(error):
        publish_domain_event(**arguments, connection_settings=None)
    with pytest.raises(error):
        publisher.publish_event(DomainEvent(**arguments))
    assert publisher._sender is not None and publisher._sender.link.connection is None


def test_data_nested_up_to_the_limit_is_sent(publisher: Publisher) -> None:
    publisher.publish_event(DomainEvent("edges.nobody", deep(_validate.MAX_DEPTH - 1)))
    with pytest.raises(ValueError, match="nested deeper"):
        publisher.publish_event(DomainEvent("edges.nobody", deep(_validate.MAX_DEPTH)))


def test_a_deeply_nested_body_is_a_malformed_event_not_a_recursion_error() -> None:
    body = '{"routing_key": "a.b", "data": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(DomainEventBrokerError):
        DomainEvent.from_json(body)


# -- publishing what no queue receives ----------------------------------------------------------


def test_require_route_raises_when_no_queue_is_bound(
    own_vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A virtual host of its own: on the shared one a queue may bind "#".
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", own_vhost_url)
    key = f"edges.unbound.{uuid.uuid4().hex}"
    publish_domain_event(key, {})  # the default: confirmed, and discarded by the broker
    with pytest.raises(UnroutableError, match="no queue is bound"):
        publish_domain_event(key, {}, require_route=True)
    with Publisher(own_vhost_url, timeout=10) as publisher:
        with pytest.raises(UnroutableError):
            publisher.publish_event(DomainEvent(key, {}), require_route=True)
        with pytest.raises(UnroutableError):
            publisher.publish(b"{}", key, require_route=True)
    configure(require_route=True)
    with pytest.raises(UnroutableError):
        publish_domain_event(key, {})
    publish_domain_event(key, {}, require_route=False)  # the argument wins


def test_require_route_passes_when_a_queue_is_bound(channel: BlockingChannel, names: Names) -> None:
    queue = names.new("edges-route")
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, "domain-events", routing_key=queue)
    publish_domain_event(queue, {"n": 1}, require_route=True)
    assert channel.queue_declare(queue, passive=True).method.message_count == 1


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_require_route_must_be_a_bool(value: Any) -> None:
    with pytest.raises(ConfigurationError):
        configure(require_route=value)
    with pytest.raises(TypeError):
        publish_domain_event("a.b", {}, connection_settings=None, require_route=value)


# -- registering: nothing declared when an argument is wrong ------------------------------------


def test_binding_key_longer_than_255_bytes_declares_nothing(broker_url: str, names: Names) -> None:
    name = names.new("edges-reg")
    subscriber = Subscriber(broker_url)
    try:
        with pytest.raises(ValueError, match="255 bytes"):
            subscriber.register(lambda event: None, name, ["k" * 256], dead_letter=True)
    finally:
        subscriber.stop_consuming()
    assert not exists("queue", f"{name}-dl")
    assert not exists("exchange", f"{name}-dlx")
    assert not exists("queue", name)


def test_reserved_name_is_a_configuration_error(broker_url: str) -> None:
    subscriber = Subscriber(broker_url)
    name = f"amq.edges-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigurationError, match="reserves"):
        subscriber.register(lambda event: None, name, ["a.b"], dead_letter=True)
    assert subscriber._link is None  # refused before connecting
    assert not exists("exchange", f"{name}-dlx")


# -- the interactive replay at the end of its input ---------------------------------------------


def test_interactive_prompt_stops_showing_events_at_the_end_of_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read, write = os.pipe()
    os.write(write, b"r\n")
    os.close(write)
    with os.fdopen(read, "r") as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        shown = io.StringIO()
        prompt = InteractivePrompt(
            lambda text, end: shown.write(text + end), timeout=5, reader=AnswerReader(0.05)
        )
        body = json.dumps(DomainEvent("a.b", {"n": 1}).event_data).encode()
        assert prompt(body=body) == "retry"
        assert prompt(body=body) == "leave"  # the input ended
        assert shown.getvalue().endswith("Message left in queue.\n")
        before = shown.getvalue()
        for _ in range(5):
            assert prompt(body=body) == "leave"
        assert shown.getvalue() == before  # the rest is not printed


# -- properties: only TypeError, ValueError or the library's errors --------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=5)
    | st.sampled_from([object(), {1, 2}, decimal.Decimal("1.5"), datetime.datetime.now()])
)
json_like = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), children, max_size=4)
    ),
    max_leaves=20,
)
anything = json_like | st.builds(deep, st.integers(0, 1200))
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.datetimes(
        min_value=datetime.datetime(1, 1, 2),
        timezones=st.none() | st.just(datetime.timezone.utc),
    )
    | st.sampled_from([object(), (1,), {1}]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=300) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)
header_tables = st.none() | st.dictionaries(
    st.text(max_size=300) | st.integers() | st.binary(max_size=3), header_values, max_size=4
)
keys = st.text(max_size=300) | st.none() | st.integers() | st.binary(max_size=5)
timestamps = st.none() | st.floats() | st.integers(min_value=-(2**1100), max_value=2**1100)
timestamps |= st.booleans() | st.text(max_size=5)
uuids = st.none() | st.text(max_size=300) | st.integers() | st.uuids()


@settings(max_examples=300, deadline=None)
@given(
    routing_key=keys,
    data=anything,
    domain_object_id=json_like,
    uuid_string=uuids,
    timestamp=timestamps,
)
def test_publish_domain_event_arguments(
    routing_key: Any, data: Any, domain_object_id: Any, uuid_string: Any, timestamp: Any
) -> None:
    try:
        event = publish_domain_event(
            routing_key, data, domain_object_id, uuid_string, timestamp, **NOTHING
        )
    except ALLOWED as exc:
        assert not isinstance(exc, pika.exceptions.AMQPError)
        return
    # What publishing accepts, the subscriber accepts: the same event comes back.
    body = check_event(event)
    json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in {body}"))
    assert DomainEvent.from_json(body).event_data == json.loads(body)


@settings(max_examples=300, deadline=None)
@given(
    routing_key=keys,
    data=anything,
    uuid_string=uuids,
    timestamp=timestamps,
    retries=st.integers() | st.none(),
)
def test_domain_event_arguments(
    routing_key: Any, data: Any, uuid_string: Any, timestamp: Any, retries: Any
) -> None:
    event = DomainEvent(routing_key, data, None, uuid_string, timestamp, retries)
    repr(event)
    with contextlib.suppress(TypeError, ValueError):
        event.datetime  # noqa: B018  # a property that may raise
    try:
        body = event.to_json()
    except (TypeError, ValueError):
        return
    assert json.loads(body)["routing_key"] == routing_key


@pytest.fixture(scope="module")
def shared_publisher() -> Iterator[Publisher]:
    # Module scope: hypothesis runs many examples through one connection.
    with Publisher(timeout=10) as publisher:
        yield publisher


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    headers=header_tables,
    message=st.binary(max_size=10) | st.text(max_size=10) | st.integers() | st.none(),
    routing_key=keys,
)
def test_publisher_arguments_against_the_broker(
    broker_url: str, shared_publisher: Publisher, headers: Any, message: Any, routing_key: Any
) -> None:
    """Whatever the validators let through, pika encodes and the broker confirms."""
    event_key = routing_key if isinstance(routing_key, str) else "edges.nobody"
    try:
        shared_publisher.publish_event(DomainEvent(event_key, {}), headers=headers)
    except ALLOWED as exc:
        assert not isinstance(exc, pika.exceptions.AMQPError)
    assume(isinstance(headers, dict) or headers is None)
    try:
        shared_publisher.publish(
            message, routing_key, properties=pika.BasicProperties(headers=headers)
        )
    except ALLOWED as exc:
        assert not isinstance(exc, pika.exceptions.AMQPError)


names_strategy = st.text(max_size=260) | st.sampled_from(["amq.x", "amq.", "amq"]) | st.integers()


@settings(max_examples=300, deadline=None)
@given(
    name=names_strategy,
    binding_keys=st.lists(keys, max_size=3) | keys,
    max_retries=st.integers() | st.booleans() | st.none() | st.floats(),
    handler=st.sampled_from([print, None, 3]),
)
def test_subscriber_register_arguments(
    name: Any, binding_keys: Any, max_retries: Any, handler: Any
) -> None:
    subscriber = Subscriber(connection_settings=None)
    try:
        subscriber.register(handler, name, binding_keys, max_retries=max_retries)
    except ALLOWED as exc:
        assert not isinstance(exc, pika.exceptions.AMQPError)
        return
    # Accepted: every name derived from it is a valid AMQP short string.
    assert not name.startswith("amq.")
    for derived in (f"{name}-retry", f"{name}-dlx", f"{name}-dl", f"{name}-delay-999999999"):
        assert len(derived.encode("utf-8")) <= 255


@settings(max_examples=300, deadline=None)
@given(
    broker=st.none()
    | st.text(max_size=60)
    | st.lists(st.text(max_size=30) | st.integers(), max_size=3)
    | st.integers(),
    timeout=st.floats()
    | st.integers(min_value=-(2**1100), max_value=2**1100)
    | st.text(max_size=3),
    require_route=st.booleans() | st.none() | st.integers(),
)
def test_configure_arguments(broker: Any, timeout: Any, require_route: Any) -> None:
    try:
        configure(broker=broker, timeout=timeout, require_route=require_route)
    except ALLOWED as exc:
        assert not isinstance(exc, pika.exceptions.AMQPError)
    finally:
        configure(broker=None)


def _exact_builtins(value: Any) -> bool:
    """Whether ``value`` is made of exact JSON built-in types only (no subclasses)."""
    kind = type(value)
    if kind in (dict,):
        return all(type(key) is str and _exact_builtins(item) for key, item in value.items())
    if kind in (list, tuple):
        return all(_exact_builtins(item) for item in value)
    return value is None or kind in (str, int, bool, float)


@settings(max_examples=500, deadline=None)
@given(value=anything)
def test_the_fast_json_check_agrees_with_the_careful_one(value: Any) -> None:
    fast = _validate._is_plain_json(value, 0)
    try:
        _validate._check_json(value, "data", 0, set())  # the walk with error messages
    except (TypeError, ValueError, RecursionError):
        careful = False
    else:
        careful = True
    assert not fast or careful  # what the fast check passes is strict JSON
    if careful and _exact_builtins(value):
        assert fast  # and it passes all strict JSON of exact types (the hot path)
    if fast:
        json.dumps(value, allow_nan=False)


@given(random=st.binary(min_size=16, max_size=16))
def test_new_uuids_are_uuid4_strings(random: bytes) -> None:
    with unittest.mock.patch.object(events_module.os, "urandom", return_value=random):
        text = events_module._new_uuid_string()
    assert text == str(uuid.UUID(bytes=random, version=4))
