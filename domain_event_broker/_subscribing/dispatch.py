"""The policy for one delivery: what happens to it, decided without I/O.

:func:`dispatch` takes one delivery, runs its handler, and returns an
:class:`Outcome`: acknowledge it, retry it after a delay, dead-letter it with
these headers, or stop the worker and leave it for redelivery. Nothing raised
anywhere inside (by the handler, by decoding, or by this module's own code)
escapes: every exception becomes an outcome for that delivery. No threads, no
channel: the handler thread calls it, tests call it directly.
"""

from __future__ import annotations

import enum
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Final

import pika

from .._amqp import names as _names
from .._amqp.pika_internals import UndecodableProperties
from .._core import headers as _headers
from .._telemetry.log_fields import log_fields
from ..errors import MalformedEventError
from ..events import DomainEvent
from .registration import MAX_RETRY_DELAY, Registration, Retry

__all__ = ["Action", "Delivery", "Outcome", "dispatch", "failed", "failure_headers", "fields"]

log = logging.getLogger(__name__)

#: Stands in for an exception's text when ``str(exc)`` itself raised.
UNPRINTABLE: Final = "<the exception's text could not be produced>"


class Action(enum.Enum):
    """What the I/O thread does with a delivery."""

    ACK = "ack"
    #: Acknowledged after a failure, without a dead-letter queue to keep it;
    #: ``Outcome.headers`` say why, as a dead letter's would.
    DISCARD = "discard"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    #: Leave the event for redelivery and stop the subscriber (a handler
    #: raised SystemExit or KeyboardInterrupt); ``Outcome.error`` holds it.
    STOP = "stop"
    #: Not handled (its channel is gone, or the subscriber is stopping): the
    #: broker redelivers it.
    SKIP = "skip"


@dataclass(frozen=True)
class Delivery:
    """One message as the broker delivered it to one handler's queue."""

    registration: Registration
    delivery_tag: int
    routing_key: str
    body: bytes
    properties: pika.BasicProperties = field(default_factory=pika.BasicProperties)
    redelivered: bool = False
    #: Which channel it came on (the I/O side's count); opaque here.
    generation: int = 0


#: Header on the copy of a delivery no handler started, given back to its
#: queue when a worker stopped (see :mod:`.settle`), if the broker had marked
#: the original redelivered: the copy's handler sees ``redelivered`` too.
REDELIVERED_HEADER: Final = "x-redelivered"


@dataclass(frozen=True)
class Outcome:
    """What must happen to one delivery."""

    delivery: Delivery
    action: Action
    #: For RETRY: the delay in milliseconds.
    delay_ms: int = 0
    #: Headers to set on the retried or dead-lettered copy.
    headers: dict[str, Any] = field(default_factory=dict)
    #: For STOP: the exception to raise from ``start_consuming()``.
    error: BaseException | None = None


def dispatch(delivery: Delivery) -> Outcome:
    """Run the handler of ``delivery`` and decide what happens to it.

    Never raises: an exception anywhere, the library's own included, becomes
    a dead letter (or a logged discard, without a dead-letter queue).
    """
    try:
        return _dispatch(delivery)
    except BaseException as exc:  # noqa: BLE001  # every failure must become an outcome
        if not isinstance(exc, Exception):
            return Outcome(delivery, Action.STOP, error=exc)
        try:
            return _failure(delivery, exc, retries=_safe_retry_count(delivery), internal=True)
        except Exception:  # noqa: BLE001  # last resort: a dead letter with fixed text
            return _last_resort(delivery)


def _given_back_redelivered(delivery: Delivery) -> bool:
    headers = delivery.properties.headers
    return bool(headers) and headers.get(REDELIVERED_HEADER) is True


def _dispatch(delivery: Delivery) -> Outcome:
    registration = delivery.registration
    retries = _safe_retry_count(delivery)
    if isinstance(delivery.properties, UndecodableProperties):
        # Headers pika could not decode, described in their stead: the
        # handler would see an event without them, so it is set aside.
        error = MalformedEventError(delivery.properties.reason)
        return _failure(delivery, error, retries=retries, malformed=True)
    try:
        event = _decode(delivery.body)
    except Exception as exc:  # noqa: BLE001  # anything the decoder raises: malformed
        return _failure(delivery, exc, retries=retries, malformed=True)
    event.retries = retries
    event.redelivered = delivery.redelivered or _given_back_redelivered(delivery)
    try:
        registration.handler(event)
    except Retry as request:
        return _retry(delivery, event, request)
    except Exception as exc:  # noqa: BLE001  # any handler error is dead-lettered
        return _failure(delivery, exc, retries=retries)
    except BaseException as exc:  # noqa: BLE001  # SystemExit, KeyboardInterrupt: stop
        log.error(
            "Handler %s raised %s; stopping; the event will be redelivered",
            registration.name,
            type(exc).__name__,
            extra=fields(delivery, event),
        )
        return Outcome(delivery, Action.STOP, error=exc)
    if log.isEnabledFor(logging.DEBUG):  # spare building the fields otherwise
        log.debug(
            "Handled %s %s by %s",
            event.routing_key,
            event.uuid_string,
            registration.name,
            extra=fields(delivery, event),
        )
    return Outcome(delivery, Action.ACK)


def fields(delivery: Delivery, event: DomainEvent | None = None) -> dict[str, Any]:
    """Log record attributes for a delivery (``extra=``): uuid, routing key, handler."""
    message_id = getattr(delivery.properties, "message_id", None)
    return log_fields(
        event,
        routing_key=delivery.routing_key,
        handler=delivery.registration.name,
        event_uuid=message_id if isinstance(message_id, str) else None,
    )


def _decode(body: bytes) -> DomainEvent:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEventError(f"the body is not UTF-8: {exc}") from exc
    try:
        return DomainEvent.from_json(text)
    except MalformedEventError:
        raise
    except RecursionError as exc:
        raise MalformedEventError("the body's JSON is nested too deeply") from exc
    except Exception as exc:
        raise MalformedEventError(f"the body could not be decoded: {type(exc).__name__}") from exc


def _retry(delivery: Delivery, event: DomainEvent, request: Retry) -> Outcome:
    registration = delivery.registration
    if event.retries >= registration.max_retries:
        return _failure(delivery, request, retries=event.retries, exceeded=True)
    delay = getattr(request, "delay", None)
    # A Retry subclass or a changed attribute may carry anything.
    if (
        isinstance(delay, bool)
        or not isinstance(delay, (int, float))
        or not 0 <= delay <= MAX_RETRY_DELAY
    ):
        error = ValueError(
            f"Retry delay must be between 0 and {MAX_RETRY_DELAY:.0f} s, not {delay!r}"
        )
        return _failure(delivery, error, retries=event.retries)
    log.info(
        "Retry %d/%d of %s %s by %s in %.3fs",
        event.retries + 1,
        registration.max_retries,
        event.routing_key,
        event.uuid_string,
        registration.name,
        delay,
        extra=fields(delivery, event),
    )
    return Outcome(
        delivery,
        Action.RETRY,
        delay_ms=_names.delay_ms(delay),
        headers={_headers.RETRY_COUNT: event.retries + 1},
    )


def _failure(
    delivery: Delivery,
    exc: BaseException,
    *,
    retries: int,
    malformed: bool = False,
    exceeded: bool = False,
    internal: bool = False,
) -> Outcome:
    registration = delivery.registration
    if exceeded:
        message = f"gave up after max_retries={registration.max_retries} retries"
    else:
        message = exception_text(exc)
    exc_type = qualified_name(type(exc))
    if malformed:
        what = "a malformed message"
    elif internal:
        what = "an event (error inside the library's own handling)"
    else:
        what = "an event"
    exc_info = (type(exc), exc, exc.__traceback__)
    headers = failure_headers(registration.name, exc_type, message, _format_traceback(exc), retries)
    if not registration.dead_letter:
        log.error(
            "Handler %s failed on %s (routing key %s): %s: %s; discarded (no dead-letter queue)",
            registration.name,
            what,
            delivery.routing_key,
            exc_type,
            message,
            exc_info=exc_info,
            extra=fields(delivery),
        )
        return Outcome(delivery, Action.DISCARD, headers=headers)
    log.error(
        "Handler %s failed on %s (routing key %s): %s: %s; dead-lettering it to %s",
        registration.name,
        what,
        delivery.routing_key,
        exc_type,
        message,
        _names.dead_letter_queue(registration.name),
        exc_info=exc_info,
        extra=fields(delivery),
    )
    headers = failure_headers(registration.name, exc_type, message, _format_traceback(exc), retries)
    return Outcome(delivery, Action.DEAD_LETTER, headers=headers)


def failed(delivery: Delivery, exc: BaseException, *, retries: int) -> Outcome:
    """The outcome of ``delivery`` failing with ``exc`` (logged like a handler error)."""
    try:
        return _failure(delivery, exc, retries=retries)
    except Exception:  # noqa: BLE001  # last resort: a dead letter with fixed text
        return _last_resort(delivery)


def failure_headers(
    handler: str, exc_type: str, message: str, formatted_traceback: str, retries: int
) -> dict[str, Any]:
    """The headers written on every dead letter, as text AMQP can carry."""
    return {
        _headers.EXCEPTION_TYPE: _header_text(exc_type),
        _headers.EXCEPTION_MESSAGE: _header_text(
            _headers.truncate(message, _headers.MAX_MESSAGE_CHARS)
        ),
        _headers.EXCEPTION_TRACEBACK: _header_text(
            _headers.truncate(formatted_traceback, _headers.MAX_TRACEBACK_CHARS)
        ),
        _headers.FAILED_HANDLER: _header_text(handler),
        _headers.FAILED_AT: int(time.time()),
        _headers.RETRY_COUNT: retries,
    }


def exception_text(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when producing it raises."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001  # a broken __str__ must not stop dead-lettering
        return UNPRINTABLE
    return text if isinstance(text, str) else UNPRINTABLE


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, whatever its attributes hold."""
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", None)
    if not isinstance(name, str):
        name = getattr(cls, "__name__", "<unknown>")
    if not isinstance(module, str) or module == "builtins":
        return str(name)
    return f"{module}.{name}"


def _format_traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # noqa: BLE001  # formatting can call a broken __str__
        return f"{qualified_name(type(exc))}: {UNPRINTABLE}"


def _header_text(text: str) -> str:
    """``text`` made encodable as UTF-8 (lone surrogates replaced)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _safe_retry_count(delivery: Delivery) -> int:
    try:
        return _headers.retry_count(delivery.properties.headers)
    except Exception:  # noqa: BLE001  # odd headers count as no retry yet
        return 0


def _last_resort(delivery: Delivery) -> Outcome:
    registration = delivery.registration
    log.error(
        "Handler %s: could not describe a failure; %s",
        registration.name,
        "dead-lettering it" if registration.dead_letter else "discarding it",
        extra=fields(delivery),
    )
    headers = failure_headers(registration.name, "<unknown>", UNPRINTABLE, "", 0)
    if not registration.dead_letter:
        return Outcome(delivery, Action.DISCARD, headers=headers)
    return Outcome(delivery, Action.DEAD_LETTER, headers=headers)
