"""Structured log fields and a health-check heartbeat, for running workers.

Log records about an event carry three attributes, so JSON formatters and
structlog can index them without parsing the message:

``event_uuid``
    the event's ``uuid_string`` (``None`` when unknown, e.g. a malformed
    message);
``routing_key``
    the routing key the message was published or delivered with;
``handler``
    the handler (queue) name, ``None`` outside a handler.

The library passes them with ``extra=`` (see :func:`log_fields`); inside a
handler, :class:`EventLogFilter` adds them to the records of *your* loggers
too, from the event being handled in the current thread::

    handler = logging.StreamHandler()
    handler.addFilter(EventLogFilter())
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(name)s [%(handler)s %(event_uuid)s] %(message)s"))

Tracing and metrics (OpenTelemetry) need no set-up here: install the
``otel`` extra and configure an OpenTelemetry SDK; see
:doc:`/production`.

.. versionadded:: 4.1
"""

from __future__ import annotations

from ._telemetry.heartbeat import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_STALL_AFTER,
    Heartbeat,
    health_file_age,
)
from ._telemetry.log_fields import EVENT_FIELDS, EventLogFilter, event_log_context, log_fields

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_STALL_AFTER",
    "EVENT_FIELDS",
    "EventLogFilter",
    "Heartbeat",
    "event_log_context",
    "health_file_age",
    "log_fields",
]
