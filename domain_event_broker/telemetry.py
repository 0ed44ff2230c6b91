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

import logging
import os
import time
from contextvars import ContextVar, Token
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = [
    "EVENT_FIELDS",
    "EventLogFilter",
    "Heartbeat",
    "event_log_context",
    "health_file_age",
    "log_fields",
]

#: The record attributes :class:`EventLogFilter` guarantees.
EVENT_FIELDS: Final = ("event_uuid", "routing_key", "handler")

#: Seconds between two touches of a health file, by default.
DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
#: A handler busy on one event for longer than this (seconds) counts as
#: stalled: the heartbeat stops until it returns.
DEFAULT_STALL_AFTER: Final = 300.0

_current: ContextVar[dict[str, Any] | None] = ContextVar(
    "domain_event_broker_event_log_fields", default=None
)


def log_fields(
    event: Any = None,
    *,
    routing_key: str | None = None,
    handler: str | None = None,
    event_uuid: str | None = None,
) -> dict[str, Any]:
    """The ``extra=`` mapping for a log call about an event.

    Args:
        event: a :class:`~domain_event_broker.DomainEvent`, or ``None`` when
            there is none (not decoded yet, or a malformed message).
        routing_key: the routing key; default: the event's.
        handler: the handler name, if any.
        event_uuid: the uuid when there is no event (e.g. the message's
            ``message_id`` property).

    Returns:
        ``{"event_uuid": ..., "routing_key": ..., "handler": ...}``.

    .. versionadded:: 4.1
    """
    uuid_string = getattr(event, "uuid_string", None) or event_uuid
    if routing_key is None:
        routing_key = getattr(event, "routing_key", None)
    return {"event_uuid": uuid_string, "routing_key": routing_key, "handler": handler}


class event_log_context:  # lower case: used like a function, in a with statement
    """Make ``event``'s log fields current in this thread (and context).

    The subscriber enters it around each handler call, so that
    :class:`EventLogFilter` can add the fields to the handler's own records.

    Args:
        event: the event being handled, or ``None``.
        routing_key: its routing key; default: the event's.
        handler: the handler name.
        event_uuid: the uuid when there is no event (yet).

    .. versionadded:: 4.1
    """

    __slots__ = ("_fields", "_token")

    def __init__(
        self,
        event: Any = None,
        *,
        routing_key: str | None = None,
        handler: str | None = None,
        event_uuid: str | None = None,
    ) -> None:
        self._fields = log_fields(
            event, routing_key=routing_key, handler=handler, event_uuid=event_uuid
        )
        self._token: Token[dict[str, Any] | None] | None = None

    def __enter__(self) -> dict[str, Any]:
        self._token = _current.set(self._fields)
        return self._fields

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


class EventLogFilter(logging.Filter):
    """Give every record the attributes ``event_uuid``, ``routing_key`` and
    ``handler``.

    Values passed with ``extra=`` are kept; missing ones come from the event
    being handled in this thread (:class:`event_log_context`), else ``None``.
    Add it to a handler (not a logger) so that it sees the records of every
    logger. It never drops a record.

    .. versionadded:: 4.1
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the missing attributes; always ``True``."""
        current = _current.get()
        for name in EVENT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, None if current is None else current.get(name))
        return True


class Heartbeat:
    """Touches a file while a worker is connected and not stalled.

    A supervisor checks the file's age (``domain-event-broker health --file
    F --max-age S``): older than ``S`` means the worker is stuck, or has been
    disconnected, for at least that long.

    The subscriber calls :meth:`tick` from its consuming loop (at least once
    a second while the connection is open), passing how long its handler has
    been busy on the current event; a tick while that exceeds
    ``stall_after`` does nothing, so a hung handler makes the file go stale.

    Args:
        path: the file to touch (created when missing).
        interval: touch at most this often (seconds).
        stall_after: handler time (seconds) after which ticks are ignored.

    Raises:
        ValueError: ``interval`` or ``stall_after`` is not positive.

    .. versionadded:: 4.1
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        stall_after: float = DEFAULT_STALL_AFTER,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        if not stall_after > 0:
            raise ValueError(f"stall_after must be positive, not {stall_after!r}")
        self.path = Path(path)
        self.interval = interval
        self.stall_after = stall_after
        self._last = -float("inf")

    def __repr__(self) -> str:
        return f"<Heartbeat {str(self.path)!r} every {self.interval:g}s>"

    def tick(self, handler_busy_for: float = 0.0) -> None:
        """Touch the file if ``interval`` has passed and the handler is not stalled.

        Args:
            handler_busy_for: seconds the handler has been running on the
                current event (0 when idle).
        """
        if handler_busy_for >= self.stall_after:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.touch()

    def touch(self) -> None:
        """Touch the file now (an I/O error is logged, never raised)."""
        try:
            self.path.touch()
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "Could not touch the health file %s: %s", self.path, exc
            )

    def clear(self) -> None:
        """Remove the file (the worker stopped)."""
        self.path.unlink(missing_ok=True)


def health_file_age(path: str | os.PathLike[str]) -> float | None:
    """Seconds since ``path`` was last touched; ``None`` when it does not exist.

    .. versionadded:: 4.1
    """
    try:
        modified = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, time.time() - modified)
