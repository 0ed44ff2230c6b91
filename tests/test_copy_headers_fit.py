"""Every copy the worker publishes (retry, dead letter) fits in one frame and
records what it left out (issue 23, attack F3 and F8).

F3: an event with a legal header of about 130 KB (RabbitMQ's ``frame_max``
is 131,072 bytes) whose handler fails: the dead-letter copy added the
exception's headers and went over ``frame_max``; the broker closed the
connection (frame_too_large), the worker reconnected and got the event
again: over a hundred handler calls in ten seconds, nothing dead-lettered.

F8: headers pika decodes but cannot encode again (a ``float`` of another
client past 64 bits as a whole number, e.g. ``d 1e30``) were left out of
the copy with only a WARNING, nothing recorded on it.
"""

from __future__ import annotations

import copy
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.data
import pika.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import DomainEvent, Retry, Subscriber
from domain_event_broker._amqp import frames, pika_internals
from domain_event_broker._core import headers as _headers

from .conftest import Names
from .helpers import get_messages, queue_size, raw_connection, wait_for
from .raw_amqp import RawProperties, table
from .raw_amqp import field as raw_field

LIBRARY_HEADERS = (
    _headers.EXCEPTION_TYPE,
    _headers.EXCEPTION_MESSAGE,
    _headers.EXCEPTION_TRACEBACK,
    _headers.FAILED_HANDLER,
    _headers.FAILED_AT,
    _headers.RETRY_COUNT,
)


# -- the trimming function ----------------------------------------------------------------

scalars = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # pika decodes a float of another client as a whole number it cannot encode
    st.integers(min_value=2**63, max_value=2**130),
    st.text(min_size=1000, max_size=1000).map(lambda s: s * 20),  # 20,000+ characters
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
keys = st.one_of(st.text(min_size=1, max_size=40), st.binary(min_size=1, max_size=40))
library_values = st.fixed_dictionaries(
    {
        _headers.EXCEPTION_TYPE: st.text(max_size=100),
        _headers.EXCEPTION_MESSAGE: st.text(max_size=_headers.MAX_MESSAGE_CHARS),
        _headers.EXCEPTION_TRACEBACK: st.text(max_size=_headers.MAX_TRACEBACK_CHARS),
        _headers.FAILED_HANDLER: st.text(max_size=100),
        _headers.FAILED_AT: st.integers(min_value=0, max_value=2**31),
        _headers.RETRY_COUNT: st.integers(min_value=0, max_value=100),
    }
)


def _check_fitted(original: dict[Any, Any], fitted: frames.Fitted, budget: int) -> None:
    result = fitted.headers
    if result:
        assert frames.encoded_size(result) <= budget
    missing = {frames.shown_key(key) for key in original if key not in result}
    assert set(fitted.dropped) == missing  # nothing goes without a word
    for key, value in result.items():
        if key == _headers.DROPPED_HEADERS:
            continue
        if key in fitted.shortened:
            assert len(value) < len(original[key])
        else:
            assert value == original[key]  # what is kept is kept whole
    record = result.get(_headers.DROPPED_HEADERS)
    if fitted.dropped and result:
        assert record is not None
        if frames.SUMMARY_KEY in record:
            assert record[frames.SUMMARY_KEY].startswith(f"{len(fitted.dropped)} header(s)")
        else:
            assert set(fitted.dropped) <= set(record)  # every dropped name recorded


@given(
    original=st.dictionaries(keys, values, max_size=12),
    library=library_values,
    budget=st.integers(min_value=0, max_value=40_000),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fitted_headers_encode_within_the_budget_and_name_what_they_left_out(
    original: dict[Any, Any], library: dict[str, Any], budget: int
) -> None:
    headers = {**original, **library}
    fitted = frames.fit_headers(headers, budget, added=set(library))
    _check_fitted(headers, fitted, budget)


@given(
    original=st.dictionaries(keys, values, max_size=12),
    library=library_values,
    frame_max=st.integers(min_value=pika.spec.FRAME_MIN_SIZE, max_value=pika.spec.FRAME_MAX_SIZE),
    message_id=st.text(max_size=80),
    expiration=st.none() | st.integers(min_value=0, max_value=10**9).map(str),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_fitted_copy_s_content_header_frame_fits_in_frame_max(
    original: dict[Any, Any],
    library: dict[str, Any],
    frame_max: int,
    message_id: str,
    expiration: str | None,
) -> None:
    received = pika.BasicProperties(
        delivery_mode=2, message_id=message_id, expiration=expiration, content_type="x/y"
    )
    properties = _headers.copy_properties(received, {**original, **library})
    fitted = frames.fit_headers(
        properties.headers or {}, frames.header_budget(properties, frame_max), added=set(library)
    )
    properties.headers = fitted.headers or None
    assert len(pika.frame.Header(1, 10, properties).marshal()) <= frame_max


def test_the_library_s_traceback_is_shortened_before_any_original_header_goes() -> None:
    headers = {
        "tenant": "eu",
        "big": "x" * 5000,
        _headers.EXCEPTION_MESSAGE: "m" * 900,
        _headers.EXCEPTION_TRACEBACK: "t" * 8000,
    }
    budget = frames.encoded_size(headers) - 6000
    fitted = frames.fit_headers(
        headers, budget, added={_headers.EXCEPTION_MESSAGE, _headers.EXCEPTION_TRACEBACK}
    )
    assert fitted.shortened == [_headers.EXCEPTION_TRACEBACK]
    assert fitted.dropped == {}
    assert fitted.headers["big"] == "x" * 5000
    assert _headers.DROPPED_HEADERS not in fitted.headers
    assert frames.encoded_size(fitted.headers) <= budget


def test_an_earlier_record_of_dropped_headers_is_kept_and_added_to() -> None:
    headers = {
        _headers.DROPPED_HEADERS: {"old": "str of 9 bytes encoded: too large"},
        "huge": int(1e30),
    }
    fitted = frames.fit_headers(headers, 10_000)
    record = fitted.headers[_headers.DROPPED_HEADERS]
    assert set(record) == {"old", "huge"}
    assert "pika cannot encode it" in record["huge"]
    assert "int 1000000000000000019884624838656" in record["huge"]


def test_a_header_by_the_record_s_name_that_is_no_table_is_named_in_the_record() -> None:
    fitted = frames.fit_headers({_headers.DROPPED_HEADERS: "mine", "a": 1}, 10_000)
    assert fitted.headers["a"] == 1
    assert "not a table" in fitted.headers[_headers.DROPPED_HEADERS][_headers.DROPPED_HEADERS]


def test_the_negotiated_frame_max_is_read_from_the_connection(broker_url: str) -> None:
    connection = pika.BlockingConnection(
        pika.URLParameters(broker_url + ("&" if "?" in broker_url else "?") + "frame_max=8192")
    )
    try:
        assert pika_internals.frame_max(connection) == 8192
    finally:
        connection.close()


# -- against the broker -------------------------------------------------------------------


@dataclass
class Worker:
    name: str
    key: str
    subscriber: Subscriber
    calls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[BaseException] = field(default_factory=list)

    def count(self, marker: str) -> int:
        with self.lock:
            return self.calls.get(marker, 0)


def _worker(names: Names, **options: Any) -> Iterator[Worker]:
    name = names.new("fit")
    key = f"{name}.k"
    subscriber = Subscriber()
    worker = Worker(name, key, subscriber)

    def handler(event: DomainEvent) -> None:
        marker = event.data["marker"]
        with worker.lock:
            worker.calls[marker] = worker.calls.get(marker, 0) + 1
        if event.data.get("retry"):
            raise Retry(0)
        if event.data.get("fail"):
            raise RuntimeError(f"fails: {marker}")

    subscriber.register(handler, name, [key], dead_letter=True, **options)

    def run() -> None:
        try:
            subscriber.start_consuming()
        except BaseException as exc:
            worker.errors.append(exc)

    thread = threading.Thread(target=run, name="fit-worker")
    thread.start()
    try:
        yield worker
    finally:
        subscriber.stop_consuming()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert not worker.errors, worker.errors


@pytest.fixture
def worker(names: Names) -> Iterator[Worker]:
    yield from _worker(names)


@pytest.fixture
def retrying_worker(names: Names) -> Iterator[Worker]:
    yield from _worker(names, max_retries=2)


def _publish(key: str, data: dict[str, Any], properties: pika.BasicProperties) -> bytes:
    body = DomainEvent(key, data).to_json().encode()
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("domain-events", key, body, properties)
    finally:
        connection.close()
    return body


def _largest_header(broker_url: str) -> int:
    """A string header that just fits in a frame of this broker's connections."""
    connection = raw_connection()
    try:
        limit = pika_internals.frame_max(connection)
    finally:
        connection.close()
    properties = pika.BasicProperties(delivery_mode=2, headers={"big": ""})
    return limit - len(pika.frame.Header(1, 0, properties).marshal()) - 100


def _goes_on(worker: Worker) -> None:
    """The worker handles the next event."""
    _publish(worker.key, {"marker": "next"}, pika.BasicProperties(delivery_mode=2))
    wait_for(lambda: worker.count("next") == 1, timeout=20, message="the next event handled")


def test_a_dead_letter_of_an_event_with_a_header_near_frame_max_is_made_once(
    worker: Worker, broker_url: str
) -> None:
    size = _largest_header(broker_url)
    body = _publish(
        worker.key,
        {"marker": "big", "fail": True},
        pika.BasicProperties(delivery_mode=2, headers={"big": "x" * size, "tenant": "eu"}),
    )
    dlq = f"{worker.name}-dl"
    wait_for(lambda: queue_size(dlq) == 1, timeout=20, message="the dead letter")
    _goes_on(worker)
    assert worker.count("big") == 1
    [(_, dead, dead_body)] = get_messages(dlq)
    assert dead_body == body
    assert dead.headers["tenant"] == "eu"
    assert "big" not in dead.headers
    assert f"str of {size} bytes" in dead.headers[_headers.DROPPED_HEADERS]["big"]
    assert dead.headers[_headers.EXCEPTION_MESSAGE] == "fails: big"
    assert queue_size(worker.name) == 0


def test_retries_of_an_event_with_a_header_near_frame_max_end_in_one_dead_letter(
    retrying_worker: Worker, broker_url: str
) -> None:
    worker = retrying_worker
    size = _largest_header(broker_url)
    _publish(
        worker.key,
        {"marker": "big", "retry": True},
        pika.BasicProperties(delivery_mode=2, headers={"big": "x" * size}),
    )
    dlq = f"{worker.name}-dl"
    wait_for(lambda: queue_size(dlq) == 1, timeout=30, message="the dead letter")
    _goes_on(worker)
    assert worker.count("big") == 3  # max_retries + 1
    [(_, dead, _)] = get_messages(dlq)
    assert "big" in dead.headers[_headers.DROPPED_HEADERS]


def _double(value: float) -> bytes:
    return raw_field(b"d", struct.pack(">d", value))


def _float(value: float) -> bytes:
    return raw_field(b"f", struct.pack(">f", value))


def _encodes(value: object) -> bool:
    try:
        pika.data.encode_value([], value)
    except Exception:  # whatever pika's encoder raises
        return False
    return True


def test_a_header_pika_cannot_encode_again_is_recorded_on_the_dead_letter(
    worker: Worker,
) -> None:
    headers = table(
        [
            (b"huge", _double(1e30)),
            (b"wide", _float(3e38)),
            (b"past-63-bits", _double(1e19)),
            (b"fine", _double(2.75)),
            (b"tenant", raw_field(b"S", b"\0\0\0\x02eu")),
        ]
    )
    _publish(worker.key, {"marker": "float", "fail": True}, RawProperties(headers))
    dlq = f"{worker.name}-dl"
    wait_for(lambda: queue_size(dlq) == 1, timeout=20, message="the dead letter")
    _goes_on(worker)
    assert worker.count("float") == 1
    [(_, dead, _)] = get_messages(dlq)
    record = dead.headers[_headers.DROPPED_HEADERS]
    # 1e19 fits an unsigned 64-bit integer, which pika 1.3.0 still encodes
    # (as RabbitMQ's "l" type) and 1.4 does not: whatever pika cannot encode.
    assert set(record) == {"huge", "wide"} | (set() if _encodes(int(1e19)) else {"past-63-bits"})
    if "past-63-bits" not in record:
        assert dead.headers["past-63-bits"] == int(1e19)
    assert "int 1000000000000000019884624838656" in record["huge"]
    assert "pika cannot encode it" in record["huge"]
    assert dead.headers["fine"] == 2  # pika's truncation, kept
    assert dead.headers["tenant"] == "eu"


def test_the_record_copy_is_independent_of_the_original() -> None:
    headers = {"a": {"b": 1}}
    snapshot = copy.deepcopy(headers)
    frames.fit_headers(headers, 3)
    assert headers == snapshot


def test_a_table_nested_too_deeply_to_encode_is_recorded() -> None:
    nested: dict[str, Any] = {}
    for _ in range(2_000):
        nested = {"n": nested}
    fitted = frames.fit_headers({"deep": nested, "tenant": "eu"}, 10_000)
    assert fitted.headers["tenant"] == "eu"
    assert "RecursionError" in fitted.headers[_headers.DROPPED_HEADERS]["deep"]
