"""How a publisher's bytes reach the broker: one connection, confirms, retries.

:class:`Sender` owns a publisher's :class:`~domain_event_broker._amqp.link.Link`
(the connection and its confirm channel, with the exchange declared on each
new channel) and its batch channel, and runs every publish through one retry
loop: reconnect with backoff until the timeout, end at once on what a retry
cannot mend (refused credentials, a refused exchange, a nack).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp.config import BrokerConfig
from .._amqp.connect import CONNECTION_ERRORS, backoff_delays
from .._amqp.failures import describe_error, translate_pika_error
from .._amqp.link import Link, Recovery
from ..errors import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    DomainEventBrokerError,
    PublishError,
    PublishTimeoutError,
)
from ..events import DomainEvent
from .batch import BatchChannel, NoConfirmInTime, Results

__all__ = ["Sender"]

log = logging.getLogger("domain_event_broker.publish")

#: Channel errors that retrying will not fix: raised at once. NOT_FOUND is
#: not among them: the exchange was deleted after it was declared, and
#: reconnecting declares it again.
_FATAL_CHANNEL_CODES: Final = frozenset({pika.spec.ACCESS_REFUSED, pika.spec.PRECONDITION_FAILED})

#: What one publish attempt may raise that :meth:`Sender._sort_failure` sorts out.
_ATTEMPT_ERRORS: Final = (
    AuthenticationError,
    PublishError,
    BrokerUnavailableError,
    *CONNECTION_ERRORS,
)

_T = TypeVar("_T")


def _chained(error: DomainEventBrokerError, cause: BaseException) -> DomainEventBrokerError:
    """``error`` with ``cause`` as its ``__cause__`` (it is stored, not raised)."""
    error.__cause__ = cause
    return error


#: What an error says when the message was sent and no answer came.
MAYBE_DELIVERED: Final = (
    "it was sent, so it may or may not have reached the broker: do not take it "
    "for lost (publishing it again may make a duplicate)"
)


def _maybe_delivered(error: BrokerError) -> BrokerError:
    """``error`` for a message that was sent without an answer: the same kind
    of error, saying so, with :attr:`~BrokerError.maybe_delivered` set."""
    if error.maybe_delivered:
        return error
    flagged = type(error)(f"{error}; {MAYBE_DELIVERED}")
    flagged.maybe_delivered = True
    flagged.__cause__ = error.__cause__
    return flagged


def _not_sent(error: DomainEventBrokerError) -> DomainEventBrokerError:
    """``error`` for an event of a batch that was never written to the
    connection, so never reached the broker: the same kind of error, with
    :attr:`~BrokerError.maybe_delivered` ``False`` and a text that says so."""
    if not getattr(error, "maybe_delivered", False):
        return error
    text = str(error).split(f"; {MAYBE_DELIVERED}")[0]
    unsent = type(error)(f"{text}; this event was not sent, so it did not reach the broker")
    unsent.maybe_delivered = False  # type: ignore[attr-defined]  # a BrokerError
    unsent.__cause__ = error.__cause__
    return unsent


def _blocked_too_long(what: str, config: BrokerConfig) -> PublishTimeoutError:
    return PublishTimeoutError(
        f"{what} to {config.display}: the broker blocked the connection (a memory or "
        f"disk alarm) and did not confirm within {config.timeout:g}s; {MAYBE_DELIVERED}: "
        f"the broker publishes what it took in when the alarm clears"
    )


class Sender:
    """Sends to one exchange over one lazily opened connection, thread-safely.

    Calls are serialized by :attr:`lock`; each waits for the broker's confirms.

    Args:
        config: the resolved broker settings.
        exchange: the exchange (declared durable on each new channel).
        exchange_type: its type.
    """

    def __init__(self, config: BrokerConfig, exchange: str, exchange_type: str) -> None:
        self.config = config
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.lock = threading.RLock()
        #: The connection and its confirm channel.
        self.link = Link(config, "domain-event-broker publisher", setup=self._declare_exchange)
        #: A second channel for batches, with the library's own confirm tracking.
        self._batch: BatchChannel | None = None
        #: The "lost / reconnected" log lines and the reconnects metric.
        self._recovery = Recovery(log, config.display, component="publisher")
        #: When the connection last carried a publish (or was opened).
        self._last_used = time.monotonic()
        #: Whether the broker blocked the connection (a resource alarm).
        self._blocked = False

    def channel(self) -> BlockingChannel:
        """The confirm channel, opened if needed.

        Raises:
            AuthenticationError, BrokerUnavailableError: from connecting.
            PublishError: the broker refused the exchange.
        """
        with self.lock:
            return self.link.channel()

    def send(
        self,
        body: bytes,
        routing_key: str,
        properties: pika.BasicProperties,
        mandatory: bool = False,
        *,
        deadline: float | None = None,
    ) -> None:
        """Publish one message and wait for its confirm (see :meth:`_attempts`).

        ``deadline`` (``time.monotonic()``), when given and sooner than the
        timeout, ends the attempts.

        Raises:
            PublishError: nacked; :class:`UnroutableError` when returned.
            BrokerError: as :meth:`_attempts`.
        """

        written = False

        def publish_once(channel: BlockingChannel, deadline: float) -> None:
            nonlocal written
            written = True
            try:
                channel.basic_publish(
                    exchange=self.exchange,
                    routing_key=routing_key,
                    body=body,
                    properties=properties,
                    mandatory=mandatory,
                )
            except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
                raise translate_pika_error(exc, f"publishing {routing_key!r}") from exc

        with self.lock:
            time_limit = time.monotonic() + self.config.timeout
            try:
                self._attempts(
                    f"publishing {routing_key!r}",
                    time_limit if deadline is None else min(time_limit, deadline),
                    publish_once,
                )
            except BrokerUnavailableError as exc:
                if not written:
                    raise
                raise _maybe_delivered(exc) from exc.__cause__

    def send_batch(
        self,
        batch: Sequence[DomainEvent],
        bodies: Sequence[bytes],
        properties: Sequence[pika.BasicProperties],
        mandatory: bool = False,
    ) -> Results:
        """Send a batch until each event is confirmed or failed, within the timeout.

        Events whose fate a lost connection left unknown are sent again.

        Returns:
            index in the batch -> ``None`` (confirmed) or why it failed.
        """
        config = self.config
        results: Results = {}
        #: indexes of the events sent at least once
        written: set[int] = set()

        def send_the_rest(channel: BlockingChannel, deadline: float) -> None:
            todo = [index for index in range(len(batch)) if index not in results]
            self._batch_channel().send(
                self.exchange,
                todo,
                batch,
                bodies,
                properties,
                results,
                deadline=deadline,
                mandatory=mandatory,
                written=written,
            )

        error: DomainEventBrokerError | None = None
        with self.lock:
            deadline = time.monotonic() + config.timeout
            try:
                while len(results) < len(batch):
                    self._attempts("publishing a batch", deadline, send_the_rest)
            except NoConfirmInTime:
                self._batch = None
                blocked = self._was_blocked()
                self.link.abort("no confirm in time: connection dropped")
                if blocked:
                    error = _blocked_too_long(f"publishing a batch of {len(batch)}", config)
                else:
                    error = BrokerUnavailableError(
                        f"publishing a batch of {len(batch)} to {config.display}: no "
                        f"confirm within {config.timeout:g}s (connection dropped)"
                    )
            except DomainEventBrokerError as exc:
                error = exc
        if error is not None:
            sent_error = error
            if isinstance(error, (BrokerUnavailableError, PublishTimeoutError)):
                sent_error = _maybe_delivered(error)
            unsent_error = _not_sent(error)
            for index in range(len(batch)):
                results.setdefault(index, sent_error if index in written else unsent_error)
        return results

    def close(self) -> None:
        """Close the connection, if any; it is opened again when needed."""
        with self.lock:
            self._drop()

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's lock may be held by a thread that
        does not exist here. (The link forgets the parent's connection itself.)"""
        self.lock = threading.RLock()
        self._batch = None

    # -- the one retry loop ---------------------------------------------------

    def _attempts(
        self, what: str, deadline: float, attempt: Callable[[BlockingChannel, float], _T]
    ) -> _T:
        """Run ``attempt(channel, deadline)`` until it succeeds, reconnecting
        with backoff until ``deadline``. Caller holds the lock.

        Raises:
            DomainEventBrokerError: a failure that retrying will not mend
                (pika's error chained), or :class:`BrokerUnavailableError`
                when ``deadline`` passed.
            NoConfirmInTime: from ``attempt``.
        """
        backoff = backoff_delays()
        idle = time.monotonic() - self._last_used
        while True:
            try:
                result = attempt(self.link.channel(deadline - time.monotonic()), deadline)
                self._last_used = time.monotonic()
                self._recovery.on_connected()
                return result
            except _ATTEMPT_ERRORS as exc:
                final, last = self._sort_failure(exc, what)
                if final is not None:
                    raise final from final.__cause__
            self._on_lost(last, idle)
            pause = backoff.next()
            if time.monotonic() + pause >= deadline:
                raise BrokerUnavailableError(
                    f"{what} to {self.config.display} failed within "
                    f"{self.config.timeout:g}s: {describe_error(last)}"
                ) from last
            log.debug("%s failed (%r), retrying in %.2fs", what, last, pause)
            time.sleep(pause)

    def _sort_failure(
        self, exc: BaseException, what: str
    ) -> tuple[DomainEventBrokerError | None, BaseException]:
        """Sort out what one failed attempt raised.

        Returns:
            ``(error, exc)`` when the publish must end with ``error`` (pika's
            error chained); ``(None, cause)`` when it may be retried after a
            reconnect, ``cause`` being pika's error behind it.
        """
        if isinstance(exc, DomainEventBrokerError):
            if isinstance(exc, BrokerUnavailableError):
                # Reconnecting failed; retry while time is left. (A refused
                # exchange is a PublishError from _declare_exchange and ends here.)
                return None, exc.__cause__ or exc
            return exc, exc  # AuthenticationError, PublishError: final
        if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
            self._drop()
            return _chained(_blocked_too_long(what, self.config), exc), exc
        if (
            isinstance(exc, pika.exceptions.ChannelClosedByBroker)
            and exc.reply_code in _FATAL_CHANNEL_CODES
        ):
            self._drop()
            error = PublishError(
                f"{what} to exchange {self.exchange!r}: the broker closed the channel "
                f"({exc.reply_code} {exc.reply_text})"
            )
            return _chained(error, exc), exc
        return None, exc

    def _on_lost(self, exc: BaseException, idle: float) -> None:
        """Drop the connection; log one warning per lost connection.

        ``idle``: seconds the connection had been unused before this publish.
        Caller holds the lock.
        """
        had_connection = self.link.connection is not None
        self._drop()
        if not had_connection or self._recovery.lost:
            return
        heartbeat = self.config.heartbeat
        expected = None
        if heartbeat is not None and idle > heartbeat:
            # An idle blocking connection sends no heartbeats, so the broker
            # closes it after a while: expected, not a fault.
            expected = f"Publisher connection was idle for {idle:.0f}s and is gone"
        self._recovery.on_lost(exc, expected=expected)

    # -- channels ---------------------------------------------------------------

    def _declare_exchange(self, channel: BlockingChannel) -> None:
        """Declare the exchange durable on each new channel (the link's setup).

        Raises:
            PublishError: the broker refused it (e.g. PRECONDITION_FAILED: it exists
                with another type or durability; ACCESS_REFUSED).
        """
        self._blocked = False
        connection = channel.connection
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        try:
            channel.exchange_declare(
                exchange=self.exchange,
                exchange_type=self.exchange_type,
                durable=True,
                auto_delete=False,
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code not in _FATAL_CHANNEL_CODES:
                raise
            raise PublishError(
                f"declaring exchange {self.exchange!r} ({self.exchange_type}, durable): "
                f"the broker closed the channel ({exc.reply_code} {exc.reply_text})"
            ) from exc
        log.debug("Publisher connected to %s", self.config.display)

    def _was_blocked(self) -> bool:
        """Whether the broker blocked the connection. Caller holds the lock.

        pika hands a blocking connection's ``Connection.Blocked`` to its
        callbacks only from ``process_data_events``, which a batch's wait for
        confirms does not run: it is run here, once, without waiting.
        """
        connection = self.link.connection
        if connection is not None and connection.is_open:
            try:
                connection.process_data_events(0)
            except CONNECTION_ERRORS:
                log.debug("Connection lost while looking for a block", exc_info=True)
        return self._blocked

    def _on_blocked(self, _connection: object, _frame: object) -> None:
        # The broker blocks a publishing connection under a memory or disk alarm.
        self._blocked = True

    def _on_unblocked(self, _connection: object, _frame: object) -> None:
        self._blocked = False

    def _batch_channel(self) -> BatchChannel:
        """The batch channel on the open connection. Caller holds the lock."""
        connection = self.link.connection
        assert connection is not None
        if self._batch is None or not self._batch.usable(self.link.generation):
            self._batch = BatchChannel(connection, self.link.generation)
        return self._batch

    def _drop(self) -> None:
        """Close the connection, if any. Caller holds the lock."""
        self._batch = None
        self.link.drop()
