"""Deliveries pika's decoder cannot read end dead-lettered with the reason,
their body kept, and the worker goes on (issue 23, item 3).

The messages are written byte by byte (:mod:`tests.raw_amqp`): legal AMQP
that RabbitMQ routes as it is, but that pika's decoder rejects inside its
frame parsing (a timestamp past the year 9999, a table nested deeper than
Python's recursion limit), or decodes into values other code may trip on
(keys and short strings that are not UTF-8, bytes as a routing key).
Without the repair, each delivery of such a message killed the connection,
and the worker reconnected to the same message for ever.
"""

from __future__ import annotations

import json
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.connection
import pika.exceptions
import pika.frame
import pika.spec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import DomainEvent, Subscriber, publish_domain_event
from domain_event_broker._amqp import pika_internals
from domain_event_broker._core import headers as _headers

from .conftest import Names
from .helpers import raw_connection, wait_for
from .raw_amqp import RawProperties, array, table, timestamp
from .raw_amqp import field as raw_field

#: The largest timestamp Python's ``datetime`` holds (9999-12-31T23:59:59Z).
MAX_DATETIME_SECONDS = 253_402_300_799
#: Nesting deeper than Python's recursion limit (pika decodes recursively).
TOO_DEEP = 1_500
MALFORMED = "domain_event_broker.errors.MalformedEventError"


class HandlerFailure(Exception):
    pass


@dataclass
class Worker:
    """One subscriber consuming in a thread for a whole module of examples."""

    name: str
    key: str
    subscriber: Subscriber
    thread: threading.Thread
    handled: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[BaseException] = field(default_factory=list)

    def count(self, marker: str) -> int:
        with self.lock:
            return self.handled.get(marker, 0)


@pytest.fixture(scope="module")
def worker(broker_url: str) -> Iterator[Worker]:
    names = Names()
    name = names.new("undecodable")
    key = f"{name}.k"
    subscriber = Subscriber()
    handled: dict[str, int] = {}
    lock = threading.Lock()

    def handler(event: DomainEvent) -> None:
        marker = event.data.get("marker", "")
        with lock:
            handled[marker] = handled.get(marker, 0) + 1
        if event.data.get("fail"):
            raise HandlerFailure(marker)

    subscriber.register(handler, name, [key], dead_letter=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            subscriber.start_consuming()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="undecodable-worker")
    thread.start()
    state = Worker(name, key, subscriber, thread, handled, lock, errors)
    try:
        yield state
    finally:
        subscriber.stop_consuming()
        thread.join(timeout=30)
        names.cleanup()
    assert not thread.is_alive()
    assert not errors, errors


@pytest.fixture(scope="module")
def raw_channel(broker_url: str) -> Iterator[Any]:
    connection = raw_connection()
    channel = connection.channel()
    channel.confirm_delivery()
    yield channel
    connection.close()


def _body(marker: str, key: str, fail: bool) -> bytes:
    event = DomainEvent(key, {"marker": marker, "fail": fail})
    return event.to_json().encode()


def _pika_decodes(properties: RawProperties) -> bool:
    try:
        pika.spec.BasicProperties().decode(b"".join(properties.encode()))
    except Exception:  # whatever pika raises: it cannot
        return False
    return True


def _dead_letters(name: str) -> dict[str, tuple[pika.BasicProperties, bytes]]:
    """The dead letters in ``name``-dl by marker (taken off the queue)."""
    found = {}
    connection = raw_connection()
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(f"{name}-dl", auto_ack=True)
            if method is None:
                break
            found[json.loads(body)["data"]["marker"]] = (properties, body)
    finally:
        connection.close()
    return found


def _check(
    worker: Worker,
    raw_channel: Any,
    properties: RawProperties,
    *,
    fail: bool = False,
    exchange: str = "domain-events",
    routing_key: str | bytes | None = None,
) -> tuple[pika.BasicProperties | None, bytes]:
    """Publish one raw message and one ordinary event behind it; wait until
    the worker handled the ordinary one and settled the raw one. Returns the
    raw one's dead letter (``None`` if it was handled) and its body."""
    marker, after = str(uuid.uuid4()), str(uuid.uuid4())
    body = _body(marker, worker.key, fail)
    raw_channel.basic_publish(
        exchange, worker.key if routing_key is None else routing_key, body, properties
    )
    publish_domain_event(worker.key, {"marker": after})
    decodes = _pika_decodes(properties)
    dead: dict[str, tuple[pika.BasicProperties, bytes]] = {}

    def settled() -> bool:
        if worker.errors:
            raise worker.errors[0]
        if worker.count(after) == 0:
            return False
        if decodes and not fail:
            return worker.count(marker) >= 1
        dead.update(_dead_letters(worker.name))
        return marker in dead

    wait_for(settled, timeout=20)
    if not decodes:
        assert worker.count(marker) == 0, "a handler saw a delivery pika could not decode"
    if marker not in dead:
        return None, body
    dead_properties, dead_body = dead[marker]
    assert dead_body == body  # the body is kept, byte for byte
    return dead_properties, dead_body


# -- the cases from the issue ------------------------------------------------------------


def test_a_timestamp_past_datetime_is_dead_lettered_and_the_worker_goes_on(
    worker: Worker, raw_channel: Any
) -> None:
    headers = table([(b"sent-at", timestamp(2**40)), (b"tenant", raw_field(b"S", b"\0\0\0\x02eu"))])
    dead, _ = _check(worker, raw_channel, RawProperties(headers))
    assert dead is not None
    assert dead.headers["x-exception-type"] == MALFORMED
    assert "sent-at" in dead.headers["x-exception-message"]
    assert "1099511627776" in dead.headers["x-exception-message"]
    described = dead.headers[_headers.UNDECODABLE_HEADERS]
    assert set(described) == {"sent-at"}
    assert "timestamp 1099511627776" in described["sent-at"]
    assert dead.headers["tenant"] == "eu"  # what pika decodes is kept
    assert "sent-at" not in dead.headers
    assert dead.delivery_mode == 2


def test_a_table_nested_too_deeply_is_dead_lettered(worker: Worker, raw_channel: Any) -> None:
    nested = array([])
    for _ in range(TOO_DEEP):
        nested = array([raw_field(b"A", nested)])
    headers = table([(b"deep", raw_field(b"A", nested))])
    dead, _ = _check(worker, raw_channel, RawProperties(headers))
    assert dead is not None
    assert dead.headers["x-exception-type"] == MALFORMED
    assert "RecursionError" in dead.headers[_headers.UNDECODABLE_HEADERS]["deep"]


def test_the_lenient_decoding_is_on_whatever_the_fast_paths() -> None:
    assert pika_internals.LENIENT_DECODING_ACTIVE
    assert pika_internals.mismatches(pika_internals.REPAIR_CHECKS) == []


# -- property-based: whatever header table RabbitMQ routes ---------------------------------

short_keys = st.binary(min_size=1, max_size=20)
u8, s8 = st.integers(0, 2**8 - 1), st.integers(-(2**7), 2**7 - 1)
u16, s16 = st.integers(0, 2**16 - 1), st.integers(-(2**15), 2**15 - 1)
u32, s32 = st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1)
s64 = st.integers(-(2**63), 2**63 - 1)


def _fixed(tag: bytes, fmt: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda value: raw_field(tag, struct.pack(fmt, value)))


def _sized(tag: bytes, content: bytes) -> bytes:
    return raw_field(tag, struct.pack(">I", len(content)) + content)


#: Scalar field values of every type RabbitMQ accepts (it refuses non-finite
#: floats and unknown type tags itself), over their whole ranges.
scalars = st.one_of(
    _fixed(b"t", ">B", st.integers(0, 1)),
    _fixed(b"b", ">b", s8),
    _fixed(b"B", ">B", u8),
    _fixed(b"s", ">h", s16),
    _fixed(b"u", ">H", u16),
    _fixed(b"I", ">i", s32),
    _fixed(b"i", ">I", u32),
    _fixed(b"l", ">q", s64),
    _fixed(b"f", ">f", st.floats(allow_nan=False, allow_infinity=False, width=32)),
    _fixed(b"d", ">d", st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(u8, s32).map(lambda pair: raw_field(b"D", struct.pack(">Bi", *pair))),
    # Timestamps: ordinary ones, and past datetime's range (up to 2**64 - 1).
    st.integers(0, MAX_DATETIME_SECONDS).map(timestamp),
    st.integers(MAX_DATETIME_SECONDS + 1, 2**64 - 1).map(timestamp),
    st.binary(max_size=40).map(lambda data: _sized(b"S", data)),  # not always UTF-8
    st.binary(max_size=40).map(lambda data: _sized(b"x", data)),
    st.just(raw_field(b"V")),
)


def _deep(depth: int, tag: bytes) -> bytes:
    value = raw_field(b"V")
    for _ in range(depth):
        value = _sized(b"A", value) if tag == b"A" else _sized(b"F", b"\x01k" + value)
    return value


values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: _sized(b"A", b"".join(items))),
        st.lists(st.tuples(short_keys, inner), max_size=4).map(
            lambda entries: raw_field(b"F", table(entries))
        ),
    ),
    max_leaves=12,
) | st.tuples(st.sampled_from([5, 50, TOO_DEEP, 3 * TOO_DEEP]), st.sampled_from([b"A", b"F"])).map(
    lambda pair: _deep(*pair)
)

header_tables = st.lists(st.tuples(short_keys, values), max_size=6).map(table)
#: Short-string properties RabbitMQ passes on as they are (it checks
#: ``expiration`` and ``user_id`` itself), as any bytes.
shortstr_properties = st.dictionaries(
    st.sampled_from(["content_type", "content_encoding", "message_id", "type", "app_id"]),
    st.binary(max_size=30),
    max_size=3,
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(headers=header_tables, shortstrs=shortstr_properties, fail=st.booleans())
def test_any_header_table_ends_handled_or_dead_lettered(
    worker: Worker, raw_channel: Any, headers: bytes, shortstrs: dict[str, bytes], fail: bool
) -> None:
    """Whatever RabbitMQ routes: a delivery pika decodes reaches the handler
    (dead-lettered if the handler fails); one it cannot decode is
    dead-lettered as malformed, body kept; the next event is handled."""
    properties = RawProperties(headers, shortstrs)
    dead, _ = _check(worker, raw_channel, properties, fail=fail)
    if not _pika_decodes(properties):
        assert dead is not None
        assert dead.headers["x-exception-type"] == MALFORMED
        assert dead.headers[_headers.UNDECODABLE_HEADERS]
    elif fail:
        assert dead is not None
        assert dead.headers["x-exception-type"].endswith("HandlerFailure")
    else:
        assert dead is None


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(routing_key=st.binary(min_size=1, max_size=40), fail=st.booleans())
def test_a_routing_key_that_is_not_utf8_is_handled_or_dead_lettered(
    worker: Worker, raw_channel: Any, routing_key: bytes, fail: bool
) -> None:
    """pika hands such a key on as bytes; it reaches the queue through the
    handler's retry exchange (bound with ``#``)."""
    dead, _ = _check(
        worker,
        raw_channel,
        RawProperties(None),
        fail=fail,
        exchange=f"{worker.name}-retry",
        routing_key=routing_key,
    )
    assert (dead is not None) == fail


def test_the_raw_encoder_writes_what_pika_cannot_read() -> None:
    assert not _pika_decodes(RawProperties(table([(b"t", timestamp(2**40))])))
    assert _pika_decodes(RawProperties(table([(b"t", timestamp(0))])))


# -- the repair itself, without a broker ------------------------------------------------


def _header_frame(properties: RawProperties, body_size: int = 7) -> bytes:
    return bytes(pika.frame.Header(1, body_size, properties).marshal())


def test_a_header_frame_pika_rejects_is_decoded_field_by_field() -> None:
    headers = table(
        [
            (b"a", raw_field(b"I", struct.pack(">i", -5))),
            (b"late", timestamp(2**63)),
            (b"\xff", raw_field(b"S", b"\0\0\0\x01z")),
        ]
    )
    frame = _header_frame(RawProperties(headers, {"message_id": b"m-1", "type": b"t"}))
    with pytest.raises((ValueError, OverflowError, OSError)):
        pika.frame.decode_frame(frame)
    consumed, header = pika_internals._decode_header_frame(frame)  # type: ignore[misc]
    assert consumed == len(frame)
    assert header.body_size == 7
    properties = header.properties
    assert isinstance(properties, pika_internals.UndecodableProperties)
    assert properties.message_id == "m-1"
    assert properties.type == "t"
    assert properties.delivery_mode == 2
    assert properties.headers["a"] == -5
    assert properties.headers[b"\xff"] == "z"
    assert set(properties.undecodable) == {"late"}
    assert properties.headers[_headers.UNDECODABLE_HEADERS] == properties.undecodable
    assert "timestamp 9223372036854775808" in properties.reason


def test_frames_pika_decodes_or_that_are_not_headers_are_left_to_pika() -> None:
    frame = _header_frame(RawProperties(table([(b"a", timestamp(0))])))
    assert pika_internals._decode_header_frame(frame) is None  # nothing undecodable
    body = bytes(pika.frame.Body(1, b"{}").marshal())
    assert pika_internals._decode_header_frame(body) is None


def test_without_the_names_it_relies_on_the_repair_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(pika.connection.Connection, "_read_frame")
    assert "pika.connection.Connection._read_frame(self)" in pika_internals.mismatches(
        pika_internals.REPAIR_CHECKS
    )
    saved = pika_internals.LENIENT_DECODING_ACTIVE
    try:
        assert not pika_internals.decide_repairs()
    finally:
        pika_internals.LENIENT_DECODING_ACTIVE = saved


#: Beyond what RabbitMQ routes (it refuses these at publish): non-finite
#: floats, which pika turns into an ``int``, and type tags pika does not know.
unroutable_values = st.one_of(
    _fixed(b"d", ">d", st.sampled_from([float("inf"), float("-inf"), float("nan")])),
    _fixed(b"f", ">f", st.sampled_from([float("inf"), float("nan")])),
    st.sampled_from([b"Z", b"\x00", b"q"]).map(raw_field),
)


@settings(max_examples=300, deadline=None)
@given(
    entries=st.lists(st.tuples(short_keys, values | unroutable_values), max_size=6),
    shortstrs=shortstr_properties,
)
def test_any_header_frame_is_read_by_pika_or_described(
    entries: list[tuple[bytes, bytes]], shortstrs: dict[str, bytes]
) -> None:
    """Offline, over a wider range than the broker routes: a frame pika
    decodes is left to pika; one it rejects is decoded, nothing raised."""
    frame = _header_frame(RawProperties(table(entries), shortstrs))
    try:
        pika.frame.decode_frame(frame)
    except Exception:  # whatever pika raises
        recovered = pika_internals._decode_header_frame(frame)
        assert recovered is not None
        consumed, header = recovered
        assert consumed == len(frame)
        properties = header.properties
        assert properties.undecodable
        assert properties.headers[_headers.UNDECODABLE_HEADERS] == properties.undecodable
        assert len(properties.reason) < 400 * (len(entries) + 1)
    else:
        assert pika_internals._decode_header_frame(frame) is None
