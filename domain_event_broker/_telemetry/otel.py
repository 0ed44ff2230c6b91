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

import importlib.util
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

from .otel_base import (
    INSTRUMENTATION_NAME,
    NOOP,
    OUTCOMES,
    TRACE_HEADERS,
    Outcome,
    ProcessHook,
    Scope,
)

__all__ = [
    "ENABLED",
    "INSTRUMENTATION_NAME",
    "NOOP",
    "OUTCOMES",
    "TRACE_HEADERS",
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

#: Whether OpenTelemetry is installed (the hooks then do something). Found
#: without importing it: ``opentelemetry`` is imported by the first hook
#: call, so that ``import domain_event_broker`` stays quick.
ENABLED: Final = importlib.util.find_spec("opentelemetry") is not None

#: The hook functions, bound to the real ones by the first call of any.
_HOOKS: Final = (
    "publish_span",
    "replay_span",
    "process_span",
    "record_reconnect",
    "trace_headers",
    "use_trace_headers",
)


def load() -> None:
    """Bind the hooks of this module to OpenTelemetry's or to the no-ops."""
    implementation: Any
    try:
        from . import otel_api as implementation  # noqa: PLC0415  # the first hook call
    except ImportError:  # the [otel] extra is not installed (or is broken)
        implementation = _Noops
    namespace = globals()
    for name in _HOOKS:
        namespace[name] = getattr(implementation, name)


class _Noops:
    """The hooks without OpenTelemetry: each does nothing and returns :data:`NOOP`."""

    @staticmethod
    def publish_span(event: Any, exchange: str, headers: MutableMapping[str, Any]) -> Scope:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP

    @staticmethod
    def replay_span(
        message_id: str | None, exchange: str, routing_key: str, headers: MutableMapping[str, Any]
    ) -> Scope:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP

    @staticmethod
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

    @staticmethod
    def record_reconnect(component: str) -> None:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""

    @staticmethod
    def trace_headers() -> dict[str, str]:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return {}

    @staticmethod
    def use_trace_headers(headers: Mapping[str, Any] | None) -> Scope:
        """See the module docstring (no-op: OpenTelemetry is not installed)."""
        return NOOP


# Until the first call, each hook loads the real ones and calls through.


def publish_span(event: Any, exchange: str, headers: MutableMapping[str, Any]) -> Scope:
    """A span around publishing ``event`` (see the module docstring)."""
    load()
    return publish_span(event, exchange, headers)


def replay_span(
    message_id: str | None, exchange: str, routing_key: str, headers: MutableMapping[str, Any]
) -> Scope:
    """A span around republishing a dead letter (see the module docstring)."""
    load()
    return replay_span(message_id, exchange, routing_key, headers)


def process_span(
    handler: str,
    event: Any,
    routing_key: str,
    headers: Mapping[str, Any] | None,
    *,
    message_id: str | None = None,
) -> ProcessHook:
    """A span around handling one delivery (see the module docstring)."""
    load()
    return process_span(handler, event, routing_key, headers, message_id=message_id)


def record_reconnect(component: str) -> None:
    """Count a reopened connection (see the module docstring)."""
    load()
    record_reconnect(component)


def trace_headers() -> dict[str, str]:
    """The current trace context as AMQP headers (see the module docstring)."""
    load()
    return trace_headers()


def use_trace_headers(headers: Mapping[str, Any] | None) -> Scope:
    """Make the trace context in ``headers`` current (see the module docstring)."""
    load()
    return use_trace_headers(headers)
