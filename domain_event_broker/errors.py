"""Exceptions raised by domain-event-broker.

Every error the library raises on its own account derives from
:class:`DomainEventBrokerError`, so one ``except`` clause catches them all.
Errors caused by pika chain the original exception (``raise ... from exc``),
so its details stay available in ``__cause__``.

Hierarchy::

    DomainEventBrokerError
    ├── ConfigurationError          (also ValueError) bad URL or option
    ├── MalformedEventError         (also ValueError) body is not a domain event
    ├── BrokerError                 anything that went wrong talking to RabbitMQ
    │   ├── BrokerUnavailableError  no node answered within the deadline
    │   ├── AuthenticationError     credentials or vhost refused: not retried
    │   ├── TLSError                TLS failed (certificate, plain port): not retried
    │   └── PublishError            the broker did not confirm a publish
    │       ├── PublishTimeoutError the broker blocked the connection too long (resource alarm)
    │       ├── UnroutableError     no queue bound, and the publisher required one
    │       └── BatchPublishError   some events of a batch were not confirmed
    ├── DeadLetterQueueNotFoundError  replay on a handler without a ``-dl`` queue
    └── HandlerThreadError          a subscriber's handler thread died

Translation from pika's exceptions happens in one place,
:func:`translate_pika_error`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

if TYPE_CHECKING:
    from .events import DomainEvent

__all__ = [
    "AuthenticationError",
    "BatchPublishError",
    "BrokerError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "DeadLetterQueueNotFoundError",
    "DomainEventBrokerError",
    "HandlerThreadError",
    "MalformedEventError",
    "PublishError",
    "PublishTimeoutError",
    "TLSError",
    "UnroutableError",
]


class DomainEventBrokerError(Exception):
    """Root of every exception raised by this library."""


class ConfigurationError(DomainEventBrokerError, ValueError):
    """A connection setting or option is invalid (e.g. a malformed AMQP URL)."""


class MalformedEventError(DomainEventBrokerError, ValueError):
    """A message body could not be decoded into a :class:`DomainEvent`."""


class BrokerError(DomainEventBrokerError):
    """Talking to the broker failed."""


class BrokerUnavailableError(BrokerError):
    """No broker node could be reached, or the connection was lost, within
    the configured deadline."""


class TLSError(BrokerError):
    """A TLS connection could not be set up, for a reason retrying cannot fix.

    The server's certificate failed verification (unknown CA, expired, issued
    for another host name), the broker refused the client certificate, or
    the port does not speak TLS (e.g. a plain AMQP port behind ``amqps://``).
    The message names the cause. Not retried (like
    :class:`AuthenticationError`), and never followed by a plain-text attempt.

    .. versionadded:: 4.1
    """


class AuthenticationError(BrokerError):
    """The broker refused the credentials or the virtual host.

    Not retried: retrying cannot fix a wrong password.
    """


class PublishError(BrokerError):
    """The broker did not confirm a published message (nack or unroutable)."""


class PublishTimeoutError(PublishError):
    """The broker blocked the publishing connection (a memory or disk alarm)
    for longer than ``blocked_connection_timeout``."""


class UnroutableError(PublishError):
    """No queue was bound for the routing key, and the publisher asked to be
    told (``require_route=True``): the broker returned the message.

    .. versionadded:: 4.1
    """


class BatchPublishError(PublishError):
    """Some events of a batch were not confirmed by the broker.

    Attributes:
        failed: ``(event, error)`` pairs, in the order of the batch, for
            every event that was not confirmed; ``error`` is a library error
            saying why (nacked, returned as unroutable, no confirm in time),
            chaining pika's error where there was one.
        confirmed: the events the broker did confirm, in the order of the
            batch.

    The exception chains the cause of the first failure.

    .. versionadded:: 4.1
    """

    def __init__(
        self,
        message: str,
        failed: Sequence[tuple[DomainEvent, DomainEventBrokerError]],
        confirmed: Sequence[DomainEvent],
    ) -> None:
        super().__init__(message)
        self.failed = list(failed)
        self.confirmed = list(confirmed)


class DeadLetterQueueNotFoundError(DomainEventBrokerError):
    """Replay was asked for a handler that has no dead-letter queue."""


#: pika errors that mean "retrying cannot help".
_AUTH_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
)


class HandlerThreadError(DomainEventBrokerError):
    """A subscriber's handler thread died; ``start_consuming()`` stops with this.

    Raised instead of going on without handling events. Unacknowledged events
    are redelivered. The thread's exception is chained (``__cause__``).

    .. versionadded:: 4.1
    """


def is_auth_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal of credentials or vhost access."""
    if isinstance(exc, _AUTH_ERRORS):
        return True
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        # 403 ACCESS_REFUSED, 530 NOT_ALLOWED (e.g. unknown vhost)
        return exc.reply_code in (403, 530)
    return False


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error behind ``exc``, following pika's wrappers.

    pika wraps the real reason in ``args`` (``AMQPConnectionError``), in
    ``.exception`` (connector phase errors) or in ``.exceptions`` (workflow
    failures); others chain it with ``raise ... from``.
    """
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner: BaseException | None = None
        nested = getattr(exc, "exception", None)
        if isinstance(nested, BaseException):
            inner = nested
        elif getattr(exc, "exceptions", None):
            last = exc.exceptions[-1]  # type: ignore[attr-defined]
            inner = last if isinstance(last, BaseException) else None
        if inner is None:
            inner = next((a for a in exc.args if isinstance(a, BaseException)), None)
        if inner is None:
            inner = exc.__cause__
        if inner is None:
            return exc
        exc = inner
    return exc


def describe_error(exc: BaseException | None) -> str:  # noqa: PLR0911  # one return per cause
    """The underlying reason of ``exc`` in a few words, e.g. "connection refused".

    Args:
        exc: an error from pika or the socket layer (or a library error
            chaining one).
    """
    if exc is None:
        return "no attempt made"
    if is_auth_error(exc) or any(is_auth_error(arg) for arg in _inner(exc)):
        cause = root_cause(exc)
        detail = f" ({_text(cause)})" if _text(cause) else ""
        return f"access refused{detail}"
    cause = root_cause(exc)
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return (cause.strerror or "host name not found").lower()
    if isinstance(cause, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(cause, AMQPConnectorStackTimeout):
        return "no AMQP handshake in time (is this the AMQP port of a RabbitMQ node?)"
    if isinstance(cause, pika.exceptions.IncompatibleProtocolError):
        return "the peer does not speak AMQP 0-9-1 (is this the AMQP port?)"
    if isinstance(cause, pika.exceptions.ConnectionClosedByBroker):
        return f"closed by the broker ({cause.reply_code} {cause.reply_text})"
    if isinstance(cause, pika.exceptions.ChannelClosedByBroker):
        return f"channel closed by the broker ({cause.reply_code} {cause.reply_text})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    text = _text(cause)
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def _text(exc: BaseException) -> str:
    text = str(exc)
    return "" if text == type(exc).__name__ else text[:500]


def _inner(exc: BaseException) -> list[BaseException]:
    return [arg for arg in getattr(exc, "args", ()) if isinstance(arg, BaseException)]


def translate_pika_error(exc: BaseException, context: str) -> DomainEventBrokerError:
    """Map a pika exception to this library's hierarchy.

    Args:
        exc: the exception pika raised.
        context: a short description of what was being done, without secrets.

    Returns:
        The library error to raise, ``from exc``.
    """
    if isinstance(exc, DomainEventBrokerError):
        return exc
    if is_auth_error(exc):
        return AuthenticationError(f"{context}: access refused by the broker ({exc!r})")
    if isinstance(exc, pika.exceptions.NackError):
        return PublishError(f"{context}: the broker refused (nacked) the message")
    if isinstance(exc, pika.exceptions.UnroutableError):
        return UnroutableError(
            f"{context}: no queue is bound for this routing key, so the broker returned "
            f"the message (is the subscriber's handler registered?)"
        )
    if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
        return PublishTimeoutError(
            f"{context}: the broker blocked the connection (resource alarm) for too long"
        )
    return BrokerUnavailableError(f"{context}: {describe_error(exc)}")
