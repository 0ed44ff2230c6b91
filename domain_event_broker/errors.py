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
    ├── HandlerThreadError          a subscriber's handler thread died
    └── SubscriberStoppingError     (also RuntimeError) register() on a stopping subscriber

Translation from pika's exceptions happens in one place,
:mod:`domain_event_broker._amqp.failures`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._core.exceptions import ConfigurationError, DomainEventBrokerError, MalformedEventError
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
    "SubscriberStoppingError",
    "TLSError",
    "UnroutableError",
]


class BrokerError(DomainEventBrokerError):
    """Talking to the broker failed.

    Attributes:
        maybe_delivered: ``True`` when a publish failed after the message was
            sent, without the broker's answer (no confirm in time, a blocked
            or lost connection): the event may or may not have reached the
            broker, and may still be delivered to subscribers. Publishing it
            again is safe for subscribers that tolerate a duplicate (the same
            ``uuid_string``: at-least-once); treating it as lost is not.
            ``False`` when the broker certainly did not take it (it was never
            sent, or the broker nacked or returned it).

    .. versionchanged:: 4.2
       ``maybe_delivered``.
    """

    maybe_delivered: bool = False


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
    for longer than the timeout (``blocked_connection_timeout``).

    The event may or may not have reached the broker (:attr:`maybe_delivered`
    is ``True``): a blocked broker stops reading from the connection, and an
    event it had already taken in, or that waits in its buffers, is published
    when the alarm clears. Do not take the event for lost.
    """

    maybe_delivered = True


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
        maybe_delivered: whether some of the failed events may have reached
            the broker all the same (see below).

    The exception chains the cause of the first failure.

    "Failed" means "not confirmed", not "not delivered": an event that was
    sent but whose confirm did not come in time (a blocked connection under a
    memory alarm, a lost connection) may still have reached the broker and
    its subscribers; its ``error.maybe_delivered`` is then ``True``. Sending
    the failed events again is at-least-once delivery: a subscriber may see
    such an event twice, with the same ``uuid_string``. Events that were
    nacked, returned as unroutable, or never sent were not delivered.

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
        self.maybe_delivered = any(
            getattr(error, "maybe_delivered", False) for _, error in self.failed
        )


class DeadLetterQueueNotFoundError(DomainEventBrokerError):
    """Replay was asked for a handler that has no dead-letter queue."""


class HandlerThreadError(DomainEventBrokerError):
    """A subscriber's handler thread died; ``start_consuming()`` stops with this.

    Raised instead of going on without handling events. Unacknowledged events
    are redelivered. The thread's exception is chained (``__cause__``).

    .. versionadded:: 4.1
    """


class SubscriberStoppingError(DomainEventBrokerError, RuntimeError):
    """``Subscriber.register()`` was called while the subscriber is stopping.

    Raised at once, from any thread (a handler included), once
    ``stop_consuming()`` was called, a stop signal arrived or the
    ``start_consuming()`` timeout passed: a handler registered then would
    never consume. Register it before :meth:`~domain_event_broker.Subscriber.start_consuming`,
    or after it returned. Nothing was declared for it.

    .. versionadded:: 4.2
    """
