"""pika's exceptions, translated into this library's, in one place.

Every module that catches a pika exception hands it to
:func:`translate_pika_error` and raises the result ``from`` it, so no pika
exception reaches a caller. :func:`describe_error` puts a cause in a few
words for log lines.
"""

from __future__ import annotations

import re
import socket

import pika.exceptions
import pika.spec
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout

from ..errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigurationError,
    DomainEventBrokerError,
    PublishError,
    PublishTimeoutError,
    UnroutableError,
)

__all__ = [
    "denied_feature",
    "describe_error",
    "is_auth_error",
    "is_consumer_timeout",
    "message_size_limit",
    "root_cause",
    "translate_pika_error",
]

#: pika errors that mean "retrying cannot help".
_AUTH_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.AuthenticationError,
)


def is_auth_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a refusal of credentials or vhost access."""
    if isinstance(exc, _AUTH_ERRORS):
        return True
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        # NOT_ALLOWED: e.g. an unknown vhost
        return exc.reply_code in (pika.spec.ACCESS_REFUSED, pika.spec.NOT_ALLOWED)
    return False


#: How RabbitMQ names a deprecated feature it refuses to use ("Feature
#: `transient_nonexcl_queues` is deprecated. Its use is not permitted ...").
_DENIED_FEATURE = re.compile(r"Feature `([^`]+)` is deprecated")


def denied_feature(exc: BaseException) -> str | None:
    """The deprecated feature the broker refused, if ``exc`` is that refusal.

    RabbitMQ (3.13 and later) closes the *connection* with ``541
    INTERNAL_ERROR`` when a client uses a deprecated feature it denies, e.g.
    a transient non-exclusive queue, denied by default from 4.3 on. Retrying
    cannot help: the client has to stop using it.
    """
    if not isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return None
    if exc.reply_code != pika.spec.INTERNAL_ERROR:
        return None
    match = _DENIED_FEATURE.search(str(exc.reply_text))
    return match.group(1) if match else None


def is_consumer_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a channel closed by the broker's ``consumer_timeout``
    (a delivery held unacknowledged too long).

    RabbitMQ before 4.3 closes the channel so (``406 PRECONDITION_FAILED``,
    "delivery acknowledgement on channel N timed out"), whatever the queue
    type; 4.3 too, for a client that takes no consumer cancel notifications
    (pika takes them) or with ``consumer_timeout_response = close_channel``
    (4.3.7). Otherwise, from 4.3 on, a quorum queue *cancels the consumer*
    instead (``basic.cancel``, see the consuming loop and the dead-letter
    runs) and a classic queue has no consumer timeout at all.
    """
    return (
        isinstance(exc, pika.exceptions.ChannelClosedByBroker)
        and exc.reply_code == pika.spec.PRECONDITION_FAILED
        and "timed out" in str(exc.reply_text)
    )


#: How RabbitMQ refuses a message over its ``max_message_size`` ("message
#: size 2000158 is larger than configured max size 1048576"; without
#: "configured" when the limit is the broker's hard maximum).
_TOO_LARGE = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")


def message_size_limit(exc: BaseException) -> int | None:
    """The broker's ``max_message_size`` (bytes), if ``exc`` is, or chains,
    the broker refusing a message over it.

    RabbitMQ closes the *channel* with ``406 PRECONDITION_FAILED`` when a
    message body is larger than its ``max_message_size`` (16 MiB by default
    on 4.x, 128 MiB on 3.x). Publishing that message again cannot succeed;
    the limit is in the reply text and nowhere else.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if (
            isinstance(current, pika.exceptions.ChannelClosedByBroker)
            and current.reply_code == pika.spec.PRECONDITION_FAILED
        ):
            match = _TOO_LARGE.search(str(current.reply_text))
            if match:
                return int(match.group(2))
        current = current.__cause__ or current.__context__
    return None


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


def translate_pika_error(exc: BaseException, context: str) -> DomainEventBrokerError:  # noqa: PLR0911  # one return per cause
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
    feature = denied_feature(exc)
    if feature is not None:
        return ConfigurationError(
            f"{context}: the broker refuses the deprecated feature {feature!r} "
            f"(see RabbitMQ's deprecated features; the broker's configuration decides)"
        )
    if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
        return PublishTimeoutError(
            f"{context}: the broker blocked the connection (resource alarm) for too long"
        )
    return BrokerUnavailableError(f"{context}: {describe_error(exc)}")
