"""Structured log fields: the event a log record is about.

:mod:`domain_event_broker.telemetry` documents and re-exports these.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Final

__all__ = ["EVENT_FIELDS", "EventLogFilter", "event_log_context", "log_fields"]

#: The record attributes :class:`EventLogFilter` guarantees.
EVENT_FIELDS: Final = ("event_uuid", "routing_key", "handler")

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
