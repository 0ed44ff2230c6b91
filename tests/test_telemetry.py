"""Tracing, metrics and log fields (issue 13), with the OpenTelemetry SDK's
in-memory exporter and metric reader, against the real broker."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from domain_event_broker import (
    BrokerError,
    DomainEvent,
    Publisher,
    Subscriber,
    replay_all,
)
from domain_event_broker._telemetry import otel as instrument
from domain_event_broker._telemetry import otel_api
from domain_event_broker.telemetry import (
    EventLogFilter,
    Heartbeat,
    event_log_context,
    health_file_age,
    log_fields,
)

from .helpers import BROKER_URL, get_messages, raw_connection, wait_for
from .otel_support import Otel, otel, tracing_off

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Nothing listens here (never the shared broker).
CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:5799/%2F?connection_attempts=1"


@pytest.fixture
def tel() -> Otel:
    return otel()


@pytest.fixture(autouse=True)
def _tracing_off_after() -> Iterator[None]:
    yield
    tracing_off()  # the rest of the suite sees no trace headers


def traceparent_ids(headers: dict[str, object]) -> tuple[int, int]:
    """(trace id, span id) from a W3C traceparent header."""
    value = headers["traceparent"]
    assert isinstance(value, str)
    _version, trace_id, span_id, _flags = value.split("-")
    return int(trace_id, 16), int(span_id, 16)


def bound_queue(name: str, key: str, exchange: str = "domain-events") -> None:
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, exchange, routing_key=key)
    finally:
        connection.close()


def noop_handler(event: DomainEvent) -> None:
    pass


# -- publish -------------------------------------------------------------------


def test_publish_creates_a_producer_span_and_sends_its_context(names, tel: Otel) -> None:
    name = names.new("tel")
    key = f"{name}.created"
    bound_queue(name, key)
    published_before = tel.total(
        "domain_event_broker.events.published",
        outcome="confirmed",
        **{"messaging.destination.name": "domain-events"},
    )
    with Publisher() as publisher:
        event = publisher.publish_event(DomainEvent(key, {"a": 1}), headers={"x-mine": "kept"})

    [span] = tel.finished("publish ")
    assert span.name == "publish domain-events"
    assert span.kind is SpanKind.PRODUCER
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "domain-events",
        "messaging.rabbitmq.destination.routing_key": key,
        "messaging.message.id": event.uuid_string,
    }
    [(_, properties, _)] = wait_for(lambda: get_messages(name), message="the event")
    assert properties.headers["x-mine"] == "kept"
    assert traceparent_ids(properties.headers) == (
        span.context.trace_id,
        span.context.span_id,
    )
    assert (
        tel.total(
            "domain_event_broker.events.published",
            outcome="confirmed",
            **{"messaging.destination.name": "domain-events"},
        )
        == published_before + 1
    )


def test_publish_continues_the_callers_trace(names, tel: Otel) -> None:
    name = names.new("tel")
    key = f"{name}.created"
    bound_queue(name, key)
    with tel.tracer.start_as_current_span("request") as request, Publisher() as publisher:
        publisher.publish_event(DomainEvent(key, {}))
    [span] = tel.finished("publish ")
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert span.context.trace_id == request.get_span_context().trace_id


def test_failed_publish_records_the_error(tel: Otel) -> None:
    failed_before = tel.total("domain_event_broker.events.published", outcome="failed")
    with (
        Publisher(CLOSED_PORT_URL, timeout=0.5) as publisher,
        pytest.raises(BrokerError),
    ):
        publisher.publish_event(DomainEvent("tel.failing", {}))
    [span] = tel.finished("publish ")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"].startswith("domain_event_broker.errors.")
    assert tel.total("domain_event_broker.events.published", outcome="failed") == failed_before + 1


# -- process (the hooks the subscriber calls) -------------------------------------


def test_one_trace_from_publish_through_a_retry_to_the_handled_event(names, tel: Otel) -> None:
    name = names.new("tel")
    key = f"{name}.created"
    bound_queue(name, key)
    with Publisher() as publisher:
        event = publisher.publish_event(DomainEvent(key, {}))
    [(method, properties, body)] = wait_for(lambda: get_messages(name), message="the event")
    [publish] = tel.finished("publish ")
    handled_before = tel.total("domain_event_broker.events.handled", handler=name)
    retried_before = tel.total("domain_event_broker.events.retried", handler=name)

    # First attempt asks for a retry; the retry keeps every header, so the
    # second attempt continues the same trace.
    received = DomainEvent.from_json(body)
    for outcome in ("retry", "handled"):
        scope = instrument.process_span(name, received, method.routing_key, properties.headers)
        with scope:
            assert trace.get_current_span().get_span_context().trace_id == (
                publish.context.trace_id
            )
            if outcome == "retry":
                scope.set_outcome("retry", delay_ms=10_000)
            else:
                scope.set_outcome("handled")
        with scope.settle("ack"):
            pass

    processes = tel.finished("process ")
    assert [span.attributes["domain_event_broker.outcome"] for span in processes] == [
        "retry",
        "handled",
    ]
    for span in processes:
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == publish.context.trace_id
        assert span.parent is not None and span.parent.span_id == publish.context.span_id
        assert span.attributes["messaging.message.id"] == event.uuid_string
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == key
        assert span.attributes["messaging.consumer.group.name"] == name
        assert span.attributes["messaging.operation.type"] == "process"
    assert processes[0].attributes["domain_event_broker.retry.delay_ms"] == 10_000
    settles = tel.finished("ack ")
    assert [span.parent.span_id for span in settles if span.parent] == [
        span.context.span_id for span in processes
    ]
    assert all(span.attributes["messaging.operation.type"] == "settle" for span in settles)
    assert tel.total("domain_event_broker.events.handled", handler=name) == handled_before + 1
    assert tel.total("domain_event_broker.events.retried", handler=name) == retried_before + 1
    assert tel.total("domain_event_broker.events.in_flight", handler=name) == 0
    durations = [
        point
        for point in tel.points("domain_event_broker.handler.duration")
        if point.attributes.get("handler") == name
    ]
    assert sum(point.count for point in durations) == 2


def test_dead_letter_and_malformed_outcomes_are_errors(tel: Otel) -> None:
    handler = f"tel-{uuid.uuid4().hex[:8]}"
    with instrument.process_span(handler, DomainEvent("a.b", {}), "a.b", None) as scope:
        scope.set_outcome("dead_letter", exception_type="app.errors.Boom")
    with instrument.process_span(handler, None, "a.b", {"traceparent": b"garbage"}) as scope:
        scope.set_outcome("malformed")
    dead, malformed = tel.finished("process ")
    assert dead.status.status_code is StatusCode.ERROR
    assert dead.attributes["error.type"] == "app.errors.Boom"
    assert malformed.status.status_code is StatusCode.ERROR
    assert "messaging.message.id" not in malformed.attributes
    assert dead.parent is None  # no context in the headers: a new trace
    assert tel.total("domain_event_broker.events.dead_lettered", handler=handler) == 1
    assert (
        tel.total(
            "domain_event_broker.events.dead_lettered",
            handler=handler,
            **{"error.type": "app.errors.Boom"},
        )
        == 1
    )
    assert tel.total("domain_event_broker.events.malformed", handler=handler) == 1
    with pytest.raises(ValueError, match="outcome"):
        scope.set_outcome("lost")  # type: ignore[arg-type]


def test_an_exception_escaping_the_process_span_is_recorded(tel: Otel) -> None:
    handler = f"tel-{uuid.uuid4().hex[:8]}"
    with pytest.raises(KeyError), instrument.process_span(handler, None, "a.b", {}):
        raise KeyError("boom")
    [span] = tel.finished("process ")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "builtins.KeyError"
    assert tel.total("domain_event_broker.events.in_flight", handler=handler) == 0


def test_settle_works_from_another_thread(tel: Otel) -> None:
    scope = instrument.process_span("tel-thread", None, "a.b", None)
    with scope:
        scope.set_outcome("handled")

    def settle() -> None:
        with scope.settle("ack"):
            pass

    thread = threading.Thread(target=settle)
    thread.start()
    thread.join()
    [process] = tel.finished("process ")
    [ack] = tel.finished("ack ")
    assert ack.parent is not None and ack.parent.span_id == process.context.span_id
    assert ack.kind is SpanKind.CLIENT


def test_reconnects_are_counted(tel: Otel) -> None:
    before = tel.total("domain_event_broker.reconnects", component="subscriber")
    instrument.record_reconnect("subscriber")
    assert tel.total("domain_event_broker.reconnects", component="subscriber") == before + 1


# -- replay -------------------------------------------------------------------------


def test_a_replayed_events_span_links_to_the_original_trace(names, tel: Otel) -> None:
    name = names.new("tel")
    key = f"{name}.created"
    subscriber = Subscriber()
    subscriber.register(noop_handler, name, [key], dead_letter=True)
    subscriber.close()
    with Publisher() as publisher:
        publisher.publish_event(DomainEvent(key, {}))
    [original] = tel.finished("publish ")
    [(method, properties, body)] = wait_for(lambda: get_messages(name), message="the event")
    # The dead letter as the subscriber leaves it: the original headers kept.
    connection = raw_connection()
    try:
        connection.channel().basic_publish(f"{name}-dlx", method.routing_key, body, properties)
    finally:
        connection.close()
    wait_for(lambda: _count(f"{name}-dl") == 1, message="the dead letter")
    tel.spans.clear()

    assert replay_all(name) == 0  # none left

    [replay] = tel.finished("replay ")
    assert replay.kind is SpanKind.PRODUCER
    assert replay.attributes["messaging.operation.name"] == "replay"
    assert replay.attributes["messaging.destination.name"] == f"{name}-retry"
    assert [link.context.trace_id for link in replay.links] == [original.context.trace_id]
    assert [link.context.span_id for link in replay.links] == [original.context.span_id]
    assert replay.context.trace_id != original.context.trace_id
    # The replayed copy carries the replay's context: its handler continues it.
    [(method, properties, _)] = wait_for(lambda: get_messages(name), message="the replayed event")
    assert traceparent_ids(properties.headers) == (
        replay.context.trace_id,
        replay.context.span_id,
    )
    with instrument.process_span(name, None, method.routing_key, properties.headers) as scope:
        scope.set_outcome("handled")
    [process] = tel.finished("process ")
    assert process.parent is not None and process.parent.span_id == replay.context.span_id


def _count(queue: str) -> int:
    connection = raw_connection()
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


# -- boundaries (property-based) ----------------------------------------------------

header_values = st.one_of(
    st.text(max_size=60), st.binary(max_size=60), st.integers(), st.booleans(), st.none()
)
header_maps = st.dictionaries(st.text(min_size=1, max_size=20), header_values, max_size=6)


@settings(max_examples=60, deadline=None)
@given(headers=header_maps)
def test_publish_span_keeps_every_other_header(headers: dict[str, object]) -> None:
    otel()
    sent = dict(headers)
    with instrument.publish_span(DomainEvent("a.b", {}), "domain-events", sent):
        pass
    others = {key: value for key, value in headers.items() if key not in instrument.TRACE_HEADERS}
    assert {key: value for key, value in sent.items() if key not in instrument.TRACE_HEADERS} == (
        others
    )
    assert isinstance(sent["traceparent"], str)


@settings(max_examples=60, deadline=None)
@given(headers=header_maps, traceparent=header_values)
def test_process_span_accepts_any_headers(headers: dict[str, object], traceparent: object) -> None:
    tel = otel()
    headers = {**headers, "traceparent": traceparent}
    with instrument.process_span("tel-any", None, "a.b", headers) as scope:
        scope.set_outcome("handled")
    [span] = tel.finished("process ")
    assert span.context.is_valid


# -- log fields -------------------------------------------------------------------------


def test_log_fields_and_the_filter(caplog: pytest.LogCaptureFixture) -> None:
    event = DomainEvent("user.registered", {})
    assert log_fields(event, handler="mailer") == {
        "event_uuid": event.uuid_string,
        "routing_key": "user.registered",
        "handler": "mailer",
    }
    assert log_fields(None, routing_key="x.y") == {
        "event_uuid": None,
        "routing_key": "x.y",
        "handler": None,
    }
    assert log_fields(None, routing_key="x.y", event_uuid="m-1")["event_uuid"] == "m-1"
    assert log_fields(event, event_uuid="m-1")["event_uuid"] == event.uuid_string
    logger = logging.getLogger("tests.telemetry.logfields")
    log_filter = EventLogFilter()
    caplog.handler.addFilter(log_filter)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("outside")
            with event_log_context(event, handler="mailer"):
                logger.info("inside a handler")
                logger.info("explicit", extra=log_fields(None, routing_key="other.key"))
            logger.info("after")
    finally:
        caplog.handler.removeFilter(log_filter)
    outside, inside, explicit, after = caplog.records
    assert (outside.event_uuid, outside.routing_key, outside.handler) == (None, None, None)
    assert (inside.event_uuid, inside.routing_key, inside.handler) == (
        event.uuid_string,
        "user.registered",
        "mailer",
    )
    assert (explicit.event_uuid, explicit.routing_key, explicit.handler) == (
        None,
        "other.key",
        None,
    )
    assert after.event_uuid is None


def test_heartbeat_touches_at_most_every_interval_and_not_when_stalled(tmp_path: Path) -> None:
    path = tmp_path / "health"
    heartbeat = Heartbeat(path, interval=3600, stall_after=10)
    heartbeat.tick(handler_busy_for=11)
    assert health_file_age(path) is None  # stalled: nothing touched
    heartbeat.tick(handler_busy_for=0)
    assert path.exists()
    os.utime(path, (0, 0))
    heartbeat.tick(handler_busy_for=0)  # within the interval: not touched again
    assert health_file_age(path) is not None and health_file_age(path) > 1000
    heartbeat.touch()
    age = health_file_age(path)
    assert age is not None and age < 60
    heartbeat.clear()
    assert not path.exists()
    with pytest.raises(ValueError, match="interval"):
        Heartbeat(path, interval=0)
    with pytest.raises(ValueError, match="stall_after"):
        Heartbeat(path, stall_after=-1)


# -- without OpenTelemetry ------------------------------------------------------------------

WITHOUT_OTEL = """
import json, sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
from domain_event_broker import DomainEvent, Publisher
from domain_event_broker._telemetry import otel as _instrument
from domain_event_broker.telemetry import log_fields
assert not _instrument.ENABLED
headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
scope = _instrument.process_span("h", None, "a.b", headers)
assert scope is _instrument.NOOP
assert _instrument.publish_span(None, "x", headers) is _instrument.NOOP
with _instrument.replay_span(None, "x", "a.b", headers):
    pass
assert _instrument.trace_headers() == {}
with scope:
    scope.set_outcome("handled")
    with scope.settle("ack"):
        pass
with Publisher() as publisher:
    publisher.publish_event(DomainEvent(sys.argv[1], {}))
print(json.dumps(sorted(name for name in sys.modules if name.startswith("opentelemetry")
                        and sys.modules[name] is not None)))
"""


def test_nothing_at_all_without_the_opentelemetry_api(names) -> None:
    name = names.new("tel")
    key = f"{name}.created"
    bound_queue(name, key)
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL, key],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "DOMAIN_EVENT_BROKER": BROKER_URL},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []  # no OpenTelemetry module was loaded
    [(_, properties, _)] = wait_for(lambda: get_messages(name), message="the event")
    assert properties.headers is None  # no trace context, no other header


API_ONLY = """
import json
from domain_event_broker._telemetry import otel as _instrument
from domain_event_broker._telemetry import otel_api

TRACE = "0af7651916cd43dd8448eb211c80319c"
found = {}
untraced = _instrument.process_span("h", None, "a.b", {"x-request-id": "r"})
with untraced:
    found["untraced passes on"] = _instrument.trace_headers()
    untraced.set_outcome("handled")
parent = {"traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}
traced = _instrument.process_span("h", None, "a.b", parent)
with traced:
    found["traced passes on"] = _instrument.trace_headers().get("traceparent", "")
    traced.set_outcome("retry", delay_ms=5)
with _instrument.process_span("h", None, "a.b", None) as bare:
    bare.set_outcome("dead_letter", exception_type="x.Y")
found["scopes"] = [type(untraced).__name__, type(traced).__name__, type(bare).__name__]
found["counts"] = {
    name: sum(getattr(otel_api, name).totals().values())
    for name in ("_handled", "_retried", "_dead_lettered", "_in_flight")
}
print(json.dumps(found))
"""


def test_with_the_api_but_no_sdk_a_delivery_is_counted_and_its_context_passed_on() -> None:
    # No SDK in this process: an untraced delivery gets its counts only, no
    # span (nothing would record it); a traced one keeps its trace context
    # current in the handler (trace_headers(), which the outbox stores).
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", API_ONLY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["untraced passes on"] == {}
    assert "0af7651916cd43dd8448eb211c80319c" in found["traced passes on"]
    assert found["scopes"] == ["_ProcessCounts", "_ProcessScope", "_ProcessCounts"]
    assert found["counts"] == {"_handled": 1, "_retried": 1, "_dead_lettered": 1, "_in_flight": 0}


def test_the_message_id_property_stands_in_for_an_undecoded_event(tel: Otel) -> None:
    with instrument.process_span("tel-id", None, "a.b", None, message_id="m-1") as scope:
        scope.set_outcome("handled")
    event = DomainEvent("a.b", {})
    with instrument.process_span("tel-id", event, "a.b", None, message_id="m-2") as scope:
        scope.set_outcome("handled")
    first, second = tel.finished("process ")
    assert first.attributes["messaging.message.id"] == "m-1"
    assert second.attributes["messaging.message.id"] == event.uuid_string


field_values = st.one_of(st.none(), st.text(max_size=30))


@settings(max_examples=80, deadline=None)
@given(
    extra=st.fixed_dictionaries(
        {},
        optional={"event_uuid": field_values, "routing_key": field_values, "handler": field_values},
    ),
    current=st.tuples(field_values, field_values, field_values),
)
def test_the_filter_keeps_extras_and_fills_the_rest_from_the_handled_event(
    extra: dict[str, str | None], current: tuple[str | None, str | None, str | None]
) -> None:
    uuid_string, routing_key, handler = current
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    record.__dict__.update(extra)
    with event_log_context(None, routing_key=routing_key, handler=handler, event_uuid=uuid_string):
        assert EventLogFilter().filter(record) is True
    expected = {"event_uuid": uuid_string, "routing_key": routing_key, "handler": handler}
    expected.update(extra)
    assert {name: getattr(record, name) for name in expected} == expected


def test_the_real_worker_traces_retry_dead_letter_and_replay(names, tel: Otel) -> None:
    """One event through the Subscriber: a retry and a dead letter stay in the
    publish's trace; the replayed attempt is in a new trace linked to it."""
    from domain_event_broker import Retry, Subscriber, replay_all

    from .test_subscriber import consume_until

    name = names.new("tel")
    key = f"{name}.created"
    attempts: list[int] = []
    fixed = threading.Event()

    def handler(event: DomainEvent) -> None:
        attempts.append(event.retries)
        if fixed.is_set():
            return
        if event.retries == 0:
            raise Retry(0.05)
        raise KeyError("still down")

    subscriber = Subscriber()
    subscriber.register(handler, name, [key], dead_letter=True, max_retries=3)
    with Publisher() as publisher:
        event = publisher.publish_event(DomainEvent(key, {}))
    consume_until(subscriber, lambda: len(attempts) == 2 and _count(f"{name}-dl") == 1)
    fixed.set()
    assert replay_all(name) == 0  # none left in -dl
    consume_until(subscriber, lambda: len(attempts) == 3 and len(tel.finished("process ")) == 3)

    [publish] = tel.finished("publish ")
    processes = tel.finished("process ")
    outcomes = [span.attributes["domain_event_broker.outcome"] for span in processes]
    assert outcomes == ["retry", "dead_letter", "handled"]
    assert all(span.attributes["messaging.message.id"] == event.uuid_string for span in processes)
    first, dead, replayed = processes
    assert first.context.trace_id == dead.context.trace_id == publish.context.trace_id
    assert dead.attributes["error.type"] == "KeyError"
    [replay] = tel.finished("replay ")
    assert replayed.context.trace_id == replay.context.trace_id != publish.context.trace_id
    assert [link.context.trace_id for link in replay.links] == [publish.context.trace_id]


# -- the fast paths agree with the propagator ---------------------------------------

hex_digits = "0123456789abcdef"
traceparents = st.one_of(
    st.builds(
        lambda lead, version, trace_id, span_id, flags, tail: (
            f"{lead}{version}-{trace_id}-{span_id}-{flags}{tail}"
        ),
        st.sampled_from(["", " ", "\t", "x"]),
        st.sampled_from(["00", "01", "ff", "cc", "0g", "0"]),
        st.one_of(st.just("0" * 32), st.text(hex_digits, min_size=31, max_size=33)),
        st.one_of(st.just("0" * 16), st.text(hex_digits, min_size=15, max_size=17)),
        st.text("0123456789abcdefA", min_size=1, max_size=3),
        st.sampled_from(["", " ", "\t ", "-", "-x", "\n", " \n", "x", "-\n", "- y"]),
    ),
    st.text(max_size=70),
    st.text("0123456789abcdef-", min_size=54, max_size=56),
)


@settings(max_examples=300, deadline=None)
@given(
    traceparent=st.one_of(traceparents, traceparents.map(str.encode), header_values),
    others=st.dictionaries(
        st.sampled_from(["tracestate", "baggage", "x-other"]),
        st.sampled_from(["vendor=value", "k=v,l=w", "", "=", b"vendor=value"]),
        max_size=2,
    ),
)
def test_reading_the_context_agrees_with_the_propagator(
    traceparent: object, others: dict[str, object]
) -> None:
    from opentelemetry import baggage, propagate

    headers = {**others, "traceparent": traceparent}
    expected = propagate.extract(headers, getter=otel_api._GETTER)
    got = otel_api._read_context(headers)
    assert trace.get_current_span(got).get_span_context() == (
        trace.get_current_span(expected).get_span_context()
    )
    assert dict(baggage.get_all(got)) == dict(baggage.get_all(expected))
    assert len(got) == len(expected)


@settings(max_examples=100, deadline=None)
@given(
    trace_id=st.integers(1, 2**128 - 1),
    span_id=st.integers(1, 2**64 - 1),
    flags=st.integers(0, 255),
    state=st.sampled_from([None, [("vendor", "value")], [("a", "1"), ("b", "2")]]),
    with_baggage=st.booleans(),
    before=st.dictionaries(
        st.sampled_from(["traceparent", "tracestate", "baggage", "x-other"]), st.just("old")
    ),
)
def test_writing_the_context_agrees_with_the_propagator(
    trace_id: int,
    span_id: int,
    flags: int,
    state: list[tuple[str, str]] | None,
    with_baggage: bool,
    before: dict[str, str],
) -> None:
    from opentelemetry import baggage, context, propagate

    span = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=trace.TraceFlags(flags),
            trace_state=trace.TraceState(state) if state else None,
        )
    )
    expected = dict(before)
    carrier: dict[str, str] = {}
    token = context.attach(baggage.set_baggage("k", "v")) if with_baggage else None
    try:
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        for key in instrument.TRACE_HEADERS:
            expected.pop(key, None)
        expected.update(carrier)
        got = dict(before)
        otel_api._write_context(span, got)
    finally:
        if token is not None:
            context.detach(token)
    assert got == expected


def test_an_invalid_span_writes_no_context() -> None:
    headers = {"traceparent": "old", "x": 1}
    otel_api._write_context(trace.INVALID_SPAN, headers)
    assert headers == {"traceparent": "old", "x": 1}


def test_counts_from_many_threads_add_up_also_after_they_ended() -> None:
    tally = otel_api._Tally()
    key = (("handler", "tally-test"),)

    def count(times: int) -> None:
        for _ in range(times):
            tally.add(key)

    for _round in range(3):  # threads that ended are folded in by the next ones
        threads = [threading.Thread(target=count, args=(1000,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    tally.add(key, -1)
    assert tally.totals() == {key: 3 * 8 * 1000 - 1}
    [observation] = tally.observe(None)
    assert observation.value == 3 * 8 * 1000 - 1
    assert observation.attributes == {"handler": "tally-test"}
