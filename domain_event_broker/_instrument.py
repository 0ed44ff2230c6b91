"""OpenTelemetry tracing and metrics hooks, and a no-op without OpenTelemetry.

The rest of the library calls the hooks below; this module is the only one
that imports ``opentelemetry``. When ``opentelemetry-api`` is not installed
(the ``otel`` extra), every hook returns one shared do-nothing object: no
allocation, no span, no metric, and the message headers are left untouched.

Spans follow the OpenTelemetry messaging semantic conventions for RabbitMQ:

====================  =========  =====================================  ==========
span name             kind       ``messaging.operation.type`` / name    hook
====================  =========  =====================================  ==========
``publish EXCHANGE``  PRODUCER   ``send`` / ``publish``                 publish_span
``replay EXCHANGE``   PRODUCER   ``send`` / ``replay`` (+ link)         replay_span
``process HANDLER``   CONSUMER   ``process`` / ``process``              process_span
``ack HANDLER`` ...   CLIENT     ``settle`` / ``ack``, ``retry``, ...   ProcessHook.settle
====================  =========  =====================================  ==========

Attributes: ``messaging.system`` = ``rabbitmq``, ``messaging.destination.name``
(the exchange), ``messaging.rabbitmq.destination.routing_key``,
``messaging.message.id`` (the event's ``uuid_string``),
``messaging.consumer.group.name`` (the handler's queue), and
``domain_event_broker.outcome``, ``domain_event_broker.retry.delay_ms``,
``error.type`` for the outcome of a delivery.

W3C trace context travels in the AMQP headers ``traceparent`` and
``tracestate``, through the global OpenTelemetry propagator.

Hook API (what the subscriber calls, from any thread)::

    scope = process_span(handler_name, event_or_None, routing_key, headers,
                         message_id=properties.message_id)
    with scope:                      # span current in this thread
        ...call the handler...
        scope.set_outcome("handled")                 # or
        scope.set_outcome("retry", delay_ms=10_000)  # or
        scope.set_outcome("dead_letter", exception_type="app.Boom")  # or
        scope.set_outcome("malformed")
    with scope.settle("ack"):        # later, in the I/O thread
        channel.basic_ack(...)
    record_reconnect("subscriber")   # each time a lost connection is reopened
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final, Literal, Protocol

__all__ = [
    "ENABLED",
    "Outcome",
    "ProcessHook",
    "Scope",
    "process_span",
    "publish_span",
    "record_reconnect",
    "replay_span",
    "trace_headers",
    "use_trace_headers",
]

#: What became of one delivery, as :meth:`ProcessHook.set_outcome` takes it.
Outcome = Literal["handled", "retry", "dead_letter", "discarded", "malformed", "requeued"]
OUTCOMES: Final = frozenset(
    {"handled", "retry", "dead_letter", "discarded", "malformed", "requeued"}
)

#: The W3C trace-context headers this module reads and writes.
TRACE_HEADERS: Final = ("traceparent", "tracestate")

INSTRUMENTATION_NAME: Final = "domain_event_broker"


class Scope(Protocol):
    """A context manager around one operation (a span, when tracing)."""

    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ProcessHook(Scope, Protocol):
    """What :func:`process_span` returns (see the module docstring)."""

    def set_outcome(
        self, outcome: Outcome, *, delay_ms: int | None = None, exception_type: str | None = None
    ) -> None: ...

    def settle(self, operation: str) -> AbstractContextManager[Any]: ...


class _Noop:
    """The one object every hook returns when OpenTelemetry is absent."""

    __slots__ = ()

    def __enter__(self) -> _Noop:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def set_outcome(
        self, outcome: Outcome, *, delay_ms: int | None = None, exception_type: str | None = None
    ) -> None:
        """Record the delivery's outcome (nothing to record here)."""

    def settle(self, operation: str) -> _Noop:
        """A settle span (none here)."""
        return self


NOOP: Final = _Noop()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("domain-event-broker")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


try:
    from opentelemetry import context as _context
    from opentelemetry import metrics as _metrics
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
    from opentelemetry.propagators.textmap import Getter as _Getter
except ImportError:  # the [otel] extra is not installed
    _trace = None  # type: ignore[assignment]

#: Whether OpenTelemetry is importable (the hooks do something).
ENABLED: Final = _trace is not None


def _validate_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")


if _trace is None:

    def publish_span(event: Any, exchange: str, headers: MutableMapping[str, Any]) -> Scope:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP

    def replay_span(
        message_id: str | None, exchange: str, routing_key: str, headers: MutableMapping[str, Any]
    ) -> Scope:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP

    def process_span(
        handler: str,
        event: Any,
        routing_key: str,
        headers: Mapping[str, Any] | None,
        *,
        message_id: str | None = None,
    ) -> ProcessHook:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP

    def record_reconnect(component: str) -> None:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""

    def trace_headers() -> dict[str, str]:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return {}

    def use_trace_headers(headers: Mapping[str, Any] | None) -> Scope:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP

else:
    _SpanKind = _trace.SpanKind
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
    _tracer = _trace.get_tracer(INSTRUMENTATION_NAME, _version())
    _meter = _metrics.get_meter(INSTRUMENTATION_NAME, _version())

    _Key = tuple[tuple[str, str], ...]

    class _Tally:
        """Cumulative counts in plain ints, reported when metrics are collected
        (through observable instruments): counting an event costs a dict
        update, not a measurement through the SDK."""

        __slots__ = ("_counts", "_lock")

        def __init__(self) -> None:
            self._counts: dict[_Key, int] = {}
            self._lock = threading.Lock()

        def add(self, key: _Key, amount: int = 1) -> None:
            with self._lock:
                self._counts[key] = self._counts.get(key, 0) + amount

        def observe(self, options: Any) -> list[Any]:
            with self._lock:
                items = list(self._counts.items())
            return [_metrics.Observation(value, dict(key)) for key, value in items]

        def reset_after_fork(self) -> None:
            self._lock = threading.Lock()
            self._counts = {}  # a child process counts its own events

    def _tally(name: str, unit: str, description: str, *, up_down: bool = False) -> _Tally:
        tally = _Tally()
        create = (
            _meter.create_observable_up_down_counter
            if up_down
            else _meter.create_observable_counter
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

    def _fail(span: Any, exc: BaseException) -> str:
        error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        span.record_exception(exc)
        span.set_status(_Status(_StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.set_attribute("error.type", error_type)
        return error_type

    class _ProducerSpan:
        """A PRODUCER span around one publish; injects its context."""

        __slots__ = ("_attributes", "_exchange", "_headers", "_links", "_name", "_span")

        def __init__(
            self,
            name: str,
            attributes: dict[str, Any],
            headers: MutableMapping[str, Any],
            exchange: str,
            links: Sequence[Any] = (),
        ) -> None:
            self._name = name
            self._attributes = attributes
            self._headers = headers
            self._exchange = exchange
            self._links = links
            self._span: Any = None

        def __enter__(self) -> _ProducerSpan:
            span = _tracer.start_span(
                self._name,
                kind=_SpanKind.PRODUCER,
                attributes=self._attributes,
                links=self._links,
            )
            self._span = span
            carrier: dict[str, str] = {}
            _propagate.inject(carrier, context=_trace.set_span_in_context(span))
            if carrier:  # only a valid span replaces the context that was there
                for key in TRACE_HEADERS:
                    self._headers.pop(key, None)
                self._headers.update(carrier)
            return self

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            span = self._span
            if exc is None:
                _published.add((("messaging.destination.name", self._exchange), _CONFIRMED))
            else:
                error_type = _fail(span, exc)
                _published.add(
                    (
                        ("messaging.destination.name", self._exchange),
                        ("outcome", "failed"),
                        ("error.type", error_type),
                    )
                )
            span.end()

    _NO_SDK: Final = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)

    def _tracing() -> bool:
        """Whether an SDK (or another real tracer provider) is set up."""
        return not isinstance(_trace.get_tracer_provider(), _NO_SDK)

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
            if exc is None:
                _published.add((("messaging.destination.name", self._exchange), _CONFIRMED))
                return
            _published.add(
                (
                    ("messaging.destination.name", self._exchange),
                    ("outcome", "failed"),
                    ("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}"),
                )
            )

    def publish_span(event: Any, exchange: str, headers: MutableMapping[str, Any]) -> Scope:
        """A PRODUCER span around publishing ``event``; on entering, the
        span's trace context is written into ``headers`` (the dict that will
        be sent). Counts the publish as confirmed, or failed when the block
        raises."""
        if not _tracing():
            return _CountOnly(exchange)
        attributes = _base_attributes("send", "publish", exchange, event.routing_key)
        message_id = _message_id(event)
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        return _ProducerSpan(f"publish {exchange}", attributes, headers, exchange)

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
        return _ProducerSpan(f"replay {exchange}", attributes, headers, exchange, links)

    class _ProcessScope:
        """The CONSUMER span of one delivery to one handler, and its metrics.

        Enter it in the thread that runs the handler (the span is current
        there, so the handler's own spans and logs belong to it); call
        :meth:`set_outcome` before leaving. :meth:`settle` may be used later
        from another thread.
        """

        __slots__ = (
            "_attributes",
            "_handler",
            "_key",
            "_outcome",
            "_parent",
            "_span",
            "_started",
            "_token",
        )

        def __init__(
            self,
            handler: str,
            event: Any,
            routing_key: str,
            headers: Mapping[str, Any] | None,
            message_id: str | None = None,
        ) -> None:
            self._handler = handler
            self._parent = _propagate.extract(headers or {}, getter=_GETTER)
            attributes = _base_attributes("process", "process", None, routing_key)
            attributes["messaging.consumer.group.name"] = handler
            message_id = _message_id(event) or message_id
            if isinstance(message_id, str):
                attributes["messaging.message.id"] = message_id
            self._attributes = attributes
            self._key: _Key = (("handler", handler),)
            self._outcome: str | None = None
            self._span: Any = None
            self._token: Any = None
            self._started = 0.0

        def __enter__(self) -> _ProcessScope:
            self._span = _tracer.start_span(
                f"process {self._handler}",
                context=self._parent,
                kind=_SpanKind.CONSUMER,
                attributes=self._attributes,
            )
            self._token = _context.attach(_trace.set_span_in_context(self._span))
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
            span = self._span
            if span is None:
                return
            span.set_attribute("domain_event_broker.outcome", outcome)
            if delay_ms is not None:
                span.set_attribute("domain_event_broker.retry.delay_ms", int(delay_ms))
            if exception_type is not None:
                span.set_attribute("error.type", exception_type)
            if outcome in ("dead_letter", "discarded", "malformed"):
                span.set_status(_Status(_StatusCode.ERROR, exception_type or outcome))
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
            span = self._span
            if exc is not None:
                _fail(span, exc)
            _duration.record(
                time.perf_counter() - self._started,
                {"handler": self._handler, "outcome": self._outcome or "unknown"},
            )
            _in_flight.add(self._key, -1)
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
        AMQP property) then stands in for its ``uuid_string``."""
        return _ProcessScope(handler, event, routing_key, headers, message_id)

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
            self._context = _propagate.extract(headers, getter=_GETTER)
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
