"""The OpenTelemetry hooks themselves: imported on the first hook call, when
``opentelemetry-api`` is installed (see :mod:`.otel`)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final

from opentelemetry import baggage as _baggage
from opentelemetry import context as _context
from opentelemetry import metrics as _metrics
from opentelemetry import propagate as _propagate
from opentelemetry import trace as _trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator as _BaggagePropagator
from opentelemetry.context import Context as _Context
from opentelemetry.propagators.composite import CompositePropagator as _Composite
from opentelemetry.propagators.textmap import Getter as _Getter
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator as _TraceContextPropagator,
)

from .._core.version import __version__
from .otel_base import INSTRUMENTATION_NAME, NOOP, TRACE_HEADERS, Outcome, ProcessHook, Scope
from .otel_base import validate_outcome as _validate_outcome

_SpanKind = _trace.SpanKind
_PRODUCER: Final = _SpanKind.PRODUCER
_CONSUMER: Final = _SpanKind.CONSUMER
_Status = _trace.Status
_StatusCode = _trace.StatusCode


class _HeaderGetter(_Getter[Mapping[str, Any]]):
    """Reads AMQP header values, which pika may hand over as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER: Final = _HeaderGetter()
_CONFIRMED: Final = ("outcome", "confirmed")
_VERSION: Final = __version__
#: A proxy: the real tracer once an SDK is set up, a no-op one before.
_tracer = _trace.get_tracer(INSTRUMENTATION_NAME, _VERSION)
_meter = _metrics.get_meter(INSTRUMENTATION_NAME, _VERSION)
_INVALID: Final = _trace.INVALID_SPAN_CONTEXT
_NO_SDK: Final = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)
_HEX: Final = tuple(f"{value:02x}" for value in range(256))

#: (global tracer provider, its tracer or None when it is no SDK); see
#: :func:`_sdk_tracer`. Replaced as a whole, so readers need no lock.
_tracer_state: tuple[Any, Any] = (None, None)


def _sdk_tracer() -> Any:
    """Our tracer from the global provider, or ``None`` when no SDK (or
    another real tracer provider) is set up. Looked up again only when
    the global provider changes: a span then costs no proxy lookups."""
    global _tracer_state  # noqa: PLW0603
    provider = _trace.get_tracer_provider()
    known, tracer = _tracer_state
    if provider is not known:
        tracer = (
            None
            if isinstance(provider, _NO_SDK)
            else provider.get_tracer(INSTRUMENTATION_NAME, _VERSION)
        )
        _tracer_state = (provider, tracer)
    return tracer


def _plain_w3c(textmap: Any) -> bool:
    """Whether ``textmap`` is W3C trace context, alone or with W3C
    baggage (OpenTelemetry's default, ``OTEL_PROPAGATORS`` unset)."""
    parts = getattr(textmap, "_propagators", None) if type(textmap) is _Composite else [textmap]
    if not isinstance(parts, (list, tuple)):
        return False
    kinds = {type(part) for part in parts}
    return _TraceContextPropagator in kinds and kinds <= {
        _TraceContextPropagator,
        _BaggagePropagator,
    }


#: (global propagator, whether it is plain W3C); see :func:`_textmap`.
_textmap_state: tuple[Any, bool] = (None, False)


def _textmap() -> tuple[Any, bool]:
    """The global propagator, and whether it is plain W3C."""
    global _textmap_state  # noqa: PLW0603
    textmap = _propagate.get_global_textmap()
    state = _textmap_state
    if textmap is not state[0]:
        state = _textmap_state = (textmap, _plain_w3c(textmap))
    return state


#: A W3C ``traceparent`` as OpenTelemetry's propagator reads it.
_TRACEPARENT: Final = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
#: The headers OpenTelemetry's default (W3C) propagator reads.
_PROPAGATED: Final = frozenset({"traceparent", "tracestate", "baggage"})
_NO_TRACE_ID: Final = "0" * 32
_NO_SPAN_ID: Final = "0" * 16


def _read_context(headers: Mapping[str, Any]) -> Any:
    """The context the global propagator extracts from ``headers``
    (an empty one when they hold no trace context).

    With the default W3C propagator and a lone ``traceparent`` (no
    ``tracestate``, no ``baggage``: the common case), this parses it as
    the propagator would, without the propagators' round trips."""
    textmap, plain = _textmap()
    if plain and "baggage" not in headers and "tracestate" not in headers:
        value = headers.get("traceparent")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            return _Context()
        if len(value) <= 512:  # else the propagator warns
            match = _TRACEPARENT.match(value)
            if match is None:
                return _Context()
            version, trace_id, span_id, flags, rest = match.groups()
            if (
                trace_id == _NO_TRACE_ID
                or span_id == _NO_SPAN_ID
                or version == "ff"
                or (version == "00" and rest)
            ):
                return _Context()
            span_context = _trace.SpanContext(
                int(trace_id, 16),
                int(span_id, 16),
                is_remote=True,
                trace_flags=_trace.TraceFlags(int(flags, 16)),
            )
            return _trace.set_span_in_context(_trace.NonRecordingSpan(span_context), _Context())
    return textmap.extract(headers, getter=_GETTER)


def _write_context(span: Any, headers: MutableMapping[str, Any]) -> None:
    """Write ``span``'s trace context (and the current baggage) into
    ``headers`` through the global propagator, replacing the trace
    context there; nothing when the span's context is invalid.

    With the default W3C propagator and no baggage, this writes the
    ``traceparent`` (and ``tracestate``) the propagator would, without
    a context object and a carrier built for it."""
    textmap, plain = _textmap()
    if plain and not _baggage.get_all():
        span_context = span.get_span_context()
        if span_context == _INVALID:
            return
        flags = span_context.trace_flags
        try:
            traceparent = "-".join(
                (
                    "00",
                    span_context.trace_id.to_bytes(16, "big").hex(),
                    span_context.span_id.to_bytes(8, "big").hex(),
                    _HEX[flags] if 0 <= flags < 256 else f"{flags:02x}",
                )
            )
        except OverflowError:  # no W3C id: let the propagator write what it will
            pass
        else:
            headers.pop("traceparent", None)
            headers.pop("tracestate", None)
            headers["traceparent"] = traceparent
            if span_context.trace_state:
                headers["tracestate"] = span_context.trace_state.to_header()
            return
    carrier: dict[str, str] = {}
    textmap.inject(carrier, context=_trace.set_span_in_context(span))
    if carrier:  # only a valid span replaces the context that was there
        for key in TRACE_HEADERS:
            headers.pop(key, None)
        headers.update(carrier)


_Key = tuple[tuple[str, str], ...]


class _Tally:
    """Cumulative counts in plain ints, reported when metrics are collected
    (through observable instruments): counting an event costs a dict
    update, not a measurement through the SDK.

    Each thread counts into a dict of its own (no lock to take: only that
    thread writes it); collecting adds them up. The counts of a thread
    that ended are folded into one dict when the next thread starts
    counting, so threads that come and go leave nothing behind."""

    __slots__ = ("_local", "_lock", "_retired", "_shards")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        #: (thread, its counts) for every thread that has counted
        self._shards: list[tuple[threading.Thread, dict[_Key, int]]] = []
        self._retired: dict[_Key, int] = {}  # counted by threads that ended

    def add(self, key: _Key, amount: int = 1) -> None:
        try:
            counts: dict[_Key, int] = self._local.counts
        except AttributeError:
            counts = self._new_shard()
        counts[key] = counts.get(key, 0) + amount

    def _new_shard(self) -> dict[_Key, int]:
        counts: dict[_Key, int] = {}
        with self._lock:
            live = []
            for thread, shard in self._shards:
                if thread.is_alive():
                    live.append((thread, shard))
                else:  # it will not count again
                    for key, value in shard.items():
                        self._retired[key] = self._retired.get(key, 0) + value
            live.append((threading.current_thread(), counts))
            self._shards = live
        self._local.counts = counts
        return counts

    def totals(self) -> dict[_Key, int]:
        """The counts so far, over all threads."""
        with self._lock:
            totals = dict(self._retired)
            shards = [shard.copy() for _, shard in self._shards]  # copy(): atomic
        for shard in shards:
            for key, value in shard.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def observe(self, options: Any) -> list[Any]:
        return [_metrics.Observation(value, dict(key)) for key, value in self.totals().items()]

    def reset_after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]  # a child process counts its own events


def _tally(name: str, unit: str, description: str, *, up_down: bool = False) -> _Tally:
    tally = _Tally()
    create = (
        _meter.create_observable_up_down_counter if up_down else _meter.create_observable_counter
    )
    create(name, callbacks=[tally.observe], unit=unit, description=description)
    os.register_at_fork(after_in_child=tally.reset_after_fork)
    return tally


_published = _tally(
    "domain_event_broker.events.published",
    "{event}",
    "Events published, by outcome (confirmed or failed) and exchange.",
)
_handled = _tally(
    "domain_event_broker.events.handled",
    "{event}",
    "Events a handler returned from, per handler.",
)
_retried = _tally(
    "domain_event_broker.events.retried",
    "{event}",
    "Events a handler asked to retry later, per handler.",
)
_dead_lettered = _tally(
    "domain_event_broker.events.dead_lettered",
    "{event}",
    "Events moved to a dead-letter queue, per handler and exception type.",
)
_malformed = _tally(
    "domain_event_broker.events.malformed",
    "{message}",
    "Messages that were no domain event, per handler.",
)
_in_flight = _tally(
    "domain_event_broker.events.in_flight",
    "{event}",
    "Events being handled right now, per handler.",
    up_down=True,
)
_reconnects = _tally(
    "domain_event_broker.reconnects",
    "{connection}",
    "Connections reopened after a loss, per component.",
)
_duration = _meter.create_histogram(
    "domain_event_broker.handler.duration",
    unit="s",
    description="Seconds from the start of a handler to its outcome, per handler and outcome.",
)

#: Attribute keys and sets built once per exchange, handler or
#: (handler, outcome), so counting builds no tuple or dict per event.
_remembered: dict[tuple[str, ...], Any] = {}


def _remember(key: tuple[str, ...], value: Any) -> Any:
    """Store ``value`` under ``key`` (bounded, for exchanges or handlers
    named on the fly); return it. Callers look ``key`` up first."""
    if len(_remembered) < 4096:
        _remembered[key] = value
    return value


def _confirmed_key(exchange: str) -> _Key:
    key: _Key = _remembered.get(("confirmed", exchange)) or _remember(
        ("confirmed", exchange), (("messaging.destination.name", exchange), _CONFIRMED)
    )
    return key


def _handler_key(handler: str) -> _Key:
    key: _Key = _remembered.get(("handler", handler)) or _remember(
        ("handler", handler), (("handler", handler),)
    )
    return key


def _duration_attributes(handler: str, outcome: str) -> dict[str, str]:
    """The histogram's attributes (one dict per set, never changed)."""
    attributes: dict[str, str] = _remembered.get(("duration", handler, outcome)) or _remember(
        ("duration", handler, outcome), {"handler": handler, "outcome": outcome}
    )
    return attributes


def _base_attributes(
    operation_type: str, operation_name: str, exchange: str | None, routing_key: str
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation_type,
        "messaging.operation.name": operation_name,
    }
    if exchange is not None:
        attributes["messaging.destination.name"] = exchange
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    return attributes


def _message_id(event: Any) -> str | None:
    uuid_string = getattr(event, "uuid_string", None)
    return uuid_string if isinstance(uuid_string, str) else None


def _error_type(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _count_publish(exchange: str, exc: BaseException | None) -> None:
    """Count one publish: confirmed, or failed with the error's type."""
    if exc is None:
        _published.add(_confirmed_key(exchange))
        return
    _published.add(
        (
            ("messaging.destination.name", exchange),
            ("outcome", "failed"),
            ("error.type", _error_type(exc)),
        )
    )


def _fail(span: Any, exc: BaseException) -> str:
    error_type = _error_type(exc)
    span.record_exception(exc)
    span.set_status(_Status(_StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute("error.type", error_type)
    return error_type


class _ProducerSpan:
    """A PRODUCER span around one publish; injects its context."""

    __slots__ = ("_attributes", "_exchange", "_headers", "_links", "_name", "_span", "_tracer")

    def __init__(
        self,
        tracer: Any,
        name: str,
        attributes: dict[str, Any],
        headers: MutableMapping[str, Any],
        exchange: str,
        links: Sequence[Any] = (),
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._attributes = attributes
        self._headers = headers
        self._exchange = exchange
        self._links = links
        self._span: Any = None

    def __enter__(self) -> _ProducerSpan:
        span = self._span = self._tracer.start_span(
            self._name,
            kind=_PRODUCER,
            attributes=self._attributes,
            links=self._links,
        )
        _write_context(span, self._headers)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if exc is not None:
            _fail(span, exc)
        _count_publish(self._exchange, exc)
        span.end()


class _CountOnly:
    """Counts a publish when there is nothing to trace (no SDK set up):
    the API alone would make a span nobody records."""

    __slots__ = ("_exchange",)

    def __init__(self, exchange: str) -> None:
        self._exchange = exchange

    def __enter__(self) -> _CountOnly:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _count_publish(self._exchange, exc)


def publish_span(event: Any, exchange: str, headers: MutableMapping[str, Any]) -> Scope:
    """A PRODUCER span around publishing ``event``; on entering, the
    span's trace context is written into ``headers`` (the dict that will
    be sent). Counts the publish as confirmed, or failed when the block
    raises."""
    tracer = _sdk_tracer()
    if tracer is None:
        return _CountOnly(exchange)
    attributes = _base_attributes("send", "publish", exchange, event.routing_key)
    message_id = _message_id(event)
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    return _ProducerSpan(tracer, f"publish {exchange}", attributes, headers, exchange)


def replay_span(
    message_id: str | None, exchange: str, routing_key: str, headers: MutableMapping[str, Any]
) -> Scope:
    """A PRODUCER span around republishing a dead letter, linked to the
    trace found in its ``headers``; that context is replaced there by the
    replay span's own, so the handler's next attempt continues the
    replay's trace (which links back to the original)."""
    attributes = _base_attributes("send", "replay", exchange, routing_key)
    if isinstance(message_id, str):
        attributes["messaging.message.id"] = message_id
    links = []
    original = _trace.get_current_span(_propagate.extract(headers, getter=_GETTER))
    span_context = original.get_span_context()
    if span_context.is_valid:
        links.append(_trace.Link(span_context, {"domain_event_broker.link": "dead_letter"}))
    return _ProducerSpan(
        _sdk_tracer() or _tracer, f"replay {exchange}", attributes, headers, exchange, links
    )


class _ProcessCounts:
    """The metrics of one delivery to one handler: in flight, outcome,
    duration. Alone (no span) when nothing would record a span or carry
    its context on: no SDK traces, and the delivery brought no trace
    context (see :func:`process_span`).

    Enter it in the thread that runs the handler; call
    :meth:`set_outcome` before leaving.
    """

    __slots__ = ("_handler", "_key", "_outcome", "_started")

    def __init__(self, handler: str) -> None:
        self._handler = handler
        self._key = _handler_key(handler)
        self._outcome: str | None = None
        self._started = 0.0

    def __enter__(self) -> _ProcessCounts:
        _in_flight.add(self._key)
        self._started = time.perf_counter()
        return self

    def set_outcome(
        self,
        outcome: Outcome,
        *,
        delay_ms: int | None = None,
        exception_type: str | None = None,
    ) -> None:
        """Record what became of the delivery.

        Args:
            outcome: ``handled``, ``retry``, ``dead_letter``, ``malformed``
                or ``requeued`` (returned to the queue unhandled).
            delay_ms: with ``retry``: the delay before the next attempt.
            exception_type: with ``dead_letter`` (and ``malformed``):
                the qualified class name of the exception.

        Raises:
            ValueError: ``outcome`` is unknown.
        """
        _validate_outcome(outcome)
        self._outcome = outcome
        if outcome == "handled":
            _handled.add(self._key)
        elif outcome == "retry":
            _retried.add(self._key)
        elif outcome == "dead_letter":
            _dead_lettered.add((*self._key, ("error.type", exception_type or "unknown")))
        elif outcome == "malformed":
            _malformed.add(self._key)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _duration.record(
            time.perf_counter() - self._started,
            _duration_attributes(self._handler, self._outcome or "unknown"),
        )
        _in_flight.add(self._key, -1)

    def settle(self, operation: str) -> AbstractContextManager[Any]:
        """A settle span: none without a process span."""
        return NOOP


class _ProcessScope(_ProcessCounts):
    """The CONSUMER span of one delivery to one handler, and its metrics.

    Enter it in the thread that runs the handler (the span is current
    there, so the handler's own spans and logs belong to it); call
    :meth:`set_outcome` before leaving. :meth:`settle` may be used later
    from another thread.
    """

    __slots__ = ("_attributes", "_parent", "_span", "_token")

    def __init__(
        self,
        handler: str,
        event: Any,
        routing_key: str,
        headers: Mapping[str, Any] | None,
        message_id: str | None = None,
    ) -> None:
        super().__init__(handler)
        self._parent = _read_context(headers or {})
        attributes = _base_attributes("process", "process", None, routing_key)
        attributes["messaging.consumer.group.name"] = handler
        message_id = _message_id(event) or message_id
        if isinstance(message_id, str):
            attributes["messaging.message.id"] = message_id
        self._attributes = attributes
        self._span: Any = None
        self._token: Any = None

    def __enter__(self) -> _ProcessScope:
        self._span = (_sdk_tracer() or _tracer).start_span(
            f"process {self._handler}",
            context=self._parent,
            kind=_CONSUMER,
            attributes=self._attributes,
        )
        self._token = _context.attach(_trace.set_span_in_context(self._span))
        super().__enter__()
        return self

    def set_outcome(
        self,
        outcome: Outcome,
        *,
        delay_ms: int | None = None,
        exception_type: str | None = None,
    ) -> None:
        """See :meth:`_ProcessCounts.set_outcome`; also on the span."""
        span = self._span
        if span is None:  # not entered: nothing counted yet, nothing to mark
            _validate_outcome(outcome)
            self._outcome = outcome
            return
        super().set_outcome(outcome, delay_ms=delay_ms, exception_type=exception_type)
        span.set_attribute("domain_event_broker.outcome", outcome)
        if delay_ms is not None:
            span.set_attribute("domain_event_broker.retry.delay_ms", int(delay_ms))
        if exception_type is not None:
            span.set_attribute("error.type", exception_type)
        if outcome in ("dead_letter", "discarded", "malformed"):
            span.set_status(_Status(_StatusCode.ERROR, exception_type or outcome))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if exc is not None:
            _fail(span, exc)
        super().__exit__(exc_type, exc, tb)
        _context.detach(self._token)
        span.end()

    def settle(self, operation: str) -> AbstractContextManager[Any]:
        """A CLIENT span, child of the process span, around settling the
        delivery (``ack``, ``nack``, ``retry``, ``dead_letter``); usable
        from any thread, also after the process span ended."""
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "settle",
            "messaging.operation.name": operation,
            "messaging.consumer.group.name": self._handler,
        }
        parent = _trace.set_span_in_context(self._span) if self._span is not None else None
        return _tracer.start_as_current_span(
            f"{operation} {self._handler}",
            context=parent,
            kind=_SpanKind.CLIENT,
            attributes=attributes,
        )


def process_span(
    handler: str,
    event: Any,
    routing_key: str,
    headers: Mapping[str, Any] | None,
    *,
    message_id: str | None = None,
) -> ProcessHook:
    """A CONSUMER span for one delivery to ``handler``, continuing the
    trace found in ``headers`` (see :class:`ProcessHook`). ``event`` is
    ``None`` when it is not decoded (yet, or at all); ``message_id`` (the
    AMQP property) then stands in for its ``uuid_string``.

    Without an SDK tracing, a delivery that brought no trace context gets
    its metrics only: a span there would be recorded by nobody and would
    carry nothing on (a quarter of an untraced delivery's CPU here)."""
    brought_context = headers is not None and not _PROPAGATED.isdisjoint(headers)
    if brought_context or _sdk_tracer() is not None or not _textmap()[1]:
        # (Another propagator than W3C may read other headers.)
        return _ProcessScope(handler, event, routing_key, headers, message_id)
    return _ProcessCounts(handler)


def record_reconnect(component: str) -> None:
    """Count a connection reopened after a loss (``publisher``,
    ``subscriber``, ...)."""
    _reconnects.add((("component", component),))


def trace_headers() -> dict[str, str]:
    """The current trace context as headers (empty when there is none),
    e.g. to store with an outbox row."""
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return carrier


class _UseContext:
    __slots__ = ("_context", "_token")

    def __init__(self, headers: Mapping[str, Any]) -> None:
        self._context = _read_context(headers)
        self._token: Any = None

    def __enter__(self) -> _UseContext:
        self._token = _context.attach(self._context)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _context.detach(self._token)


def use_trace_headers(headers: Mapping[str, Any] | None) -> Scope:
    """A context manager making the trace context stored in ``headers``
    current (e.g. the outbox relay continuing the request that wrote the
    row); does nothing when ``headers`` hold none."""
    if not headers:
        return NOOP
    return _UseContext(headers)
