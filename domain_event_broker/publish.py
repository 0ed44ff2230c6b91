"""Publishing domain events with publisher confirms over reused connections.

:class:`Publisher` owns one connection, shared (in turns) by the threads
using it. :func:`publish_domain_event` keeps a pool of publishers per
process and broker, so that threads publishing at the same moment each have
a connection, up to ``configure(max_connections=...)``.
:meth:`Publisher.publish_many` publishes a batch and waits for the broker's
confirms once, on a second channel of the publisher's connection.
"""

from __future__ import annotations

import atexit
import logging
import os
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from . import _config, _instrument, _validate
from ._config import UNSET, BrokerConfig, ConnectionSettings, _Unset
from ._connection import CONNECTION_ERRORS, backoff_delays, close_quietly, connect
from ._link import Recovery
from ._names import DEFAULT_EXCHANGE, DEFAULT_EXCHANGE_TYPE
from .errors import (
    AuthenticationError,
    BatchPublishError,
    BrokerUnavailableError,
    DomainEventBrokerError,
    PublishError,
    UnroutableError,
    describe_error,
    translate_pika_error,
)
from .events import DomainEvent, check_event, new_event, validate_routing_key

__all__ = ["Publisher", "publish_domain_event"]

log = logging.getLogger(__name__)

#: delivery_mode for messages that survive a broker restart.
PERSISTENT: Final = 2

#: Channel errors that retrying will not fix (access refused, precondition
#: failed): raised at once. 404 NOT_FOUND is not among them: the exchange was
#: deleted after it was declared, and reconnecting declares it again.
_FATAL_CHANNEL_CODES: Final = frozenset({403, 406})

#: Connections left behind by a parent process: never touched, never closed
#: (closing would write on the parent's socket), only kept from the GC.
_abandoned: list[object] = []

_live_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()

#: This process's id, kept up to date by the fork handler below.
_process_id = os.getpid()

#: Most events of a batch waiting for their confirm at once; past it,
#: publishing pauses until half of them are confirmed (keeps the client's
#: buffers and the broker's flow control in bounds).
MAX_IN_FLIGHT: Final = 1000
#: Events of a batch written into the client's buffer before it is sent.
SEND_EVERY: Final = 50


#: The AMQP ``timestamp`` property is an unsigned 64-bit integer.
_MAX_AMQP_TIMESTAMP: Final = 2**64 - 1


def _amqp_timestamp(timestamp: object) -> int | None:
    """The event's timestamp as the AMQP property, or ``None`` when it cannot
    be one (3.0.2 accepted any JSON value, e.g. a negative or a str)."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        return None
    if not 0 <= timestamp <= _MAX_AMQP_TIMESTAMP:  # also rejects NaN
        return None
    return int(timestamp)


def _event_properties(
    event: DomainEvent, headers: Mapping[str, Any] | None = None
) -> pika.BasicProperties:
    return pika.BasicProperties(
        delivery_mode=PERSISTENT,
        content_type="application/json",
        message_id=event.uuid_string,
        timestamp=_amqp_timestamp(event.timestamp),
        headers=dict(headers) if headers else None,
    )


#: What one publish attempt may raise that :meth:`Publisher._sort_failure` sorts out.
_ATTEMPT_ERRORS: Final = (
    AuthenticationError,
    PublishError,
    BrokerUnavailableError,
    *CONNECTION_ERRORS,
)


def _chained(error: DomainEventBrokerError, cause: BaseException) -> DomainEventBrokerError:
    """``error`` with ``cause`` as its ``__cause__`` (it is stored, not raised)."""
    error.__cause__ = cause
    return error


def _nothing() -> None:
    """A timer callback that only wakes pika's I/O loop up."""


class _NoConfirmInTime(Exception):
    """Internal: the deadline passed while waiting for a batch's confirms."""


class _Confirms:
    """Confirms of one batch channel, whose delivery tags count from 1.

    Called by pika's I/O loop in the publishing thread, never concurrently.
    """

    def __init__(self) -> None:
        self.selected = False
        self._next_tag = 1
        #: delivery tag -> index in the current batch, of unconfirmed events
        self._waiting: dict[int, int] = {}
        self._order: deque[int] = deque()
        #: message ids of the events the broker returned as unroutable
        self._returned: set[str] = set()
        self._batch: list[DomainEvent] = []
        self._results: dict[int, DomainEventBrokerError | None] = {}

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def start(
        self, batch: list[DomainEvent], results: dict[int, DomainEventBrokerError | None]
    ) -> None:
        self._batch, self._results = batch, results
        self._waiting.clear()
        self._order.clear()
        self._returned.clear()

    def sent(self, index: int) -> None:
        self._waiting[self._next_tag] = index
        self._order.append(self._next_tag)
        self._next_tag += 1

    def on_select_ok(self, frame: pika.frame.Method[Any]) -> None:
        self.selected = True

    def on_return(
        self,
        channel: object,
        method: pika.spec.Basic.Return,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        # The broker sends basic.return before the message's basic.ack.
        if properties.message_id is not None:
            self._returned.add(properties.message_id)

    def on_confirm(self, frame: pika.frame.Method[Any]) -> None:
        method = frame.method
        refused = isinstance(method, pika.spec.Basic.Nack)
        tag: int = method.delivery_tag
        if method.multiple:
            while self._order and self._order[0] <= tag:
                self._settle(self._order.popleft(), refused)
        else:
            self._settle(tag, refused)
            while self._order and self._order[0] not in self._waiting:
                self._order.popleft()

    def _settle(self, tag: int, refused: bool) -> None:
        index = self._waiting.pop(tag, None)
        if index is None:
            return
        event = self._batch[index]
        if refused:
            self._results[index] = PublishError(
                f"publishing {event.routing_key!r} (uuid {event.uuid_string}): "
                f"the broker refused (nacked) the message"
            )
        elif event.uuid_string in self._returned:
            self._returned.discard(event.uuid_string)
            self._results[index] = UnroutableError(
                f"publishing {event.routing_key!r} (uuid {event.uuid_string}): "
                f"the message could not be routed (no queue is bound)"
            )
        else:
            self._results[index] = None


class Publisher:
    """Publishes messages to a topic exchange over one long-lived connection.

    The connection opens on first use, is shared by all threads using this
    publisher (calls are serialized), is reopened after a loss, and is never
    reused by a forked child process. Every publish waits for the broker's
    confirm.

    Args:
        connection_settings: an AMQP URL, a list of URLs of one cluster,
            ``None`` for no broker (publishing sends nothing), or left out for
            the configured default.
        exchange: the exchange to publish to (declared durable on connect).
        exchange_type: its type.
        timeout: seconds one publish may take, reconnecting included, before
            a :class:`~domain_event_broker.BrokerError` is raised (default 30,
            see :func:`~domain_event_broker.configure`).
        ssl_context: the :class:`ssl.SSLContext` for ``amqps://`` URLs
            (default: the one given to :func:`~domain_event_broker.configure`,
            else one built from the URL's TLS options).

    Use it as a context manager, or call :meth:`close` when done.

    .. versionchanged:: 4.1
       The ``ssl_context`` argument.
    """

    def __init__(
        self,
        connection_settings: ConnectionSettings = UNSET,
        exchange: str = DEFAULT_EXCHANGE,
        exchange_type: str = DEFAULT_EXCHANGE_TYPE,
        *,
        timeout: float | _Unset = UNSET,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._config: BrokerConfig | None = _config.resolve(
            connection_settings, timeout, UNSET if ssl_context is None else ssl_context
        )
        self.exchange = _validate.exchange_name(exchange)
        _validate.exchange_name(exchange_type, "exchange_type")
        self.exchange_type = exchange_type
        self._lock = threading.RLock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        #: A second channel for batches, with the library's own confirm tracking.
        self._batch_channel: BlockingChannel | None = None
        self._confirms: _Confirms | None = None
        self._pid = os.getpid()
        #: The "lost / reconnected" log lines and the reconnects metric.
        self._recovery = Recovery(
            log, self._config.display if self._config else "", component="publisher"
        )
        #: When the connection last carried a publish (or was opened).
        self._last_used = time.monotonic()
        _live_publishers.add(self)

    def __repr__(self) -> str:
        where = "no broker" if self._config is None else self._config.display
        return f"<Publisher {where} exchange={self.exchange!r}>"

    # -- 3.0.2 compatibility: lazily connecting pika objects ---------------

    @property
    def connection_settings(self) -> str | None:
        """The broker URLs (password hidden), or ``None`` when disabled."""
        return None if self._config is None else self._config.display

    @property
    def connection(self) -> pika.BlockingConnection | None:
        """The underlying pika connection (opened if needed); ``None`` when
        the broker is disabled. Not thread-safe: prefer :meth:`publish`."""
        with self._lock:
            self._ensure_open()
            return self._connection

    @property
    def channel(self) -> BlockingChannel | None:
        """The underlying pika channel (opened if needed); ``None`` when the
        broker is disabled. Not thread-safe: prefer :meth:`publish`."""
        with self._lock:
            self._ensure_open()
            return self._channel

    def connect(self) -> None:
        """Open the connection now instead of on first publish.

        Raises:
            BrokerError: the broker could not be reached in time.
        """
        with self._lock:
            self._ensure_open()

    # -- publishing ----------------------------------------------------------

    def publish(
        self,
        message: str | bytes,
        routing_key: str | None = None,
        *,
        properties: pika.BasicProperties | None = None,
        require_route: bool | _Unset = UNSET,
    ) -> None:
        """Publish a raw message persistently and wait for the broker's confirm.

        Args:
            message: the body; ``str`` is encoded as UTF-8.
            routing_key: the routing key.
            properties: AMQP properties; default: persistent delivery.
            require_route: raise :class:`~domain_event_broker.UnroutableError`
                when no queue is bound for ``routing_key`` (the broker
                returns the message); default: see
                :func:`~domain_event_broker.configure`.

        Raises:
            ValueError: the routing key is empty, not a str or too long, or
                a header value is out of range.
            TypeError: ``message`` is not str or bytes, ``properties`` not
                ``pika.BasicProperties``, or a header of a type AMQP cannot carry.
            UnroutableError: ``require_route`` and no queue was bound.
            BrokerError: no confirm within the timeout (see the error tree).

        .. versionchanged:: 4.1
           ``require_route``; a message that is not str or bytes is refused.
        """
        routing_key = validate_routing_key(routing_key)
        if isinstance(message, str):
            body = _validate.utf8(message, "message")
        elif isinstance(message, (bytes, bytearray, memoryview)):
            body = bytes(message)
        else:
            raise TypeError(f"message must be str or bytes, not {type(message).__name__}")
        if properties is None:
            properties = pika.BasicProperties(delivery_mode=PERSISTENT)
        elif not isinstance(properties, pika.BasicProperties):
            raise TypeError(
                f"properties must be pika.BasicProperties, not {type(properties).__name__}"
            )
        else:
            _validate.properties(properties)
        mandatory = _config.default_require_route(require_route)
        if self._config is None:
            log.debug("No broker configured: not publishing %s", routing_key)
            return
        self._publish(body, routing_key, properties, mandatory)

    def publish_event(
        self,
        event: DomainEvent,
        *,
        headers: Mapping[str, Any] | None = None,
        require_route: bool | _Unset = UNSET,
    ) -> DomainEvent:
        """Publish ``event`` in the 3.0.2 wire format and wait for the confirm.

        Args:
            event: the event to publish.
            headers: optional AMQP headers to send along (see
                :doc:`errors` for the values AMQP can carry).
            require_route: raise :class:`~domain_event_broker.UnroutableError`
                when no queue is bound for the event's routing key; default:
                see :func:`~domain_event_broker.configure`.

        Returns:
            ``event``.

        Raises:
            ValueError: the routing key is invalid, the data not strict
                JSON, the timestamp not finite, or a header out of range.
            TypeError: the event's data is not JSON-serializable, a field
                of the wrong type, or a header AMQP cannot carry.
            UnroutableError: ``require_route`` and no queue was bound.
            BrokerError: no confirm within the timeout.

        .. versionadded:: 4.0
        .. versionchanged:: 4.1
           ``require_route``; every field and header is checked first.
        """
        if not isinstance(event, DomainEvent):
            raise TypeError(f"event must be a DomainEvent, not {type(event).__name__}")
        body = check_event(event).encode("utf-8")
        return self._publish_event(
            event, body, _validate.headers(headers), _config.default_require_route(require_route)
        )

    def _publish_event(
        self,
        event: DomainEvent,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
        mandatory: bool = False,
    ) -> DomainEvent:
        if _captured(event):
            return event
        if self._config is None:
            log.debug("No broker configured: not publishing %r", event)
            return event
        sent_headers = dict(headers) if headers else {}
        with _instrument.publish_span(event, self.exchange, sent_headers):  # fills trace context
            self._publish(
                body, event.routing_key, _event_properties(event, sent_headers), mandatory
            )
        return event

    def publish_many(
        self, events: Iterable[DomainEvent], *, require_route: bool | _Unset = UNSET
    ) -> list[DomainEvent]:
        """Publish ``events`` in order and wait for the broker's confirms once.

        Much faster than one :meth:`publish_event` per event: the events are
        sent back to back on a channel of their own and the broker confirms
        them as they arrive. The call returns only when every event is
        confirmed. Events whose fate is unknown after a lost connection are
        sent again on a new one (at-least-once: a consumer may see one twice,
        with the same ``uuid_string``), until the publisher's timeout.

        Args:
            events: the events to publish, in order.
            require_route: an event for whose routing key no queue is bound
                fails with :class:`~domain_event_broker.UnroutableError` (in
                the :class:`~domain_event_broker.BatchPublishError`); default:
                see :func:`~domain_event_broker.configure`.

        Returns:
            The events, as a list, in order.

        Raises:
            TypeError: an item is not a :class:`DomainEvent`, or a field of
                the wrong type, or data not JSON-serializable (nothing is sent).
            ValueError: an event's routing key is invalid, its data not strict
                JSON or its timestamp not finite (nothing is sent).
            BatchPublishError: some events were not confirmed (nacked,
                returned, or no confirm within the timeout); its ``failed``
                says which and why, its ``confirmed`` which went out.

        .. versionadded:: 4.1
        """
        mandatory = _config.default_require_route(require_route)
        batch = list(events)
        bodies = []
        for event in batch:
            if not isinstance(event, DomainEvent):
                raise TypeError(
                    f"publish_many() takes DomainEvent objects, not {type(event).__name__}"
                )
            bodies.append(check_event(event).encode("utf-8"))  # the boundary rules
        return self._publish_batch(batch, bodies, mandatory=mandatory)

    def _publish_batch(
        self,
        batch: list[DomainEvent],
        bodies: list[bytes],
        *,
        parents: Sequence[Mapping[str, Any] | None] | None = None,
        mandatory: bool = False,
    ) -> list[DomainEvent]:
        """Publish checked events with their encoded bodies; see :meth:`publish_many`.

        ``parents``: per event, the trace context (W3C headers) its publish
        span continues, e.g. the one stored with an outbox row; by default
        the current one.
        """
        if not batch or any([_captured(event) for event in batch]):
            return batch
        if self._config is None:
            log.debug("No broker configured: not publishing %d event(s)", len(batch))
            return batch
        config = self._config
        spans: list[Any] = []
        properties = []
        for index, event in enumerate(batch):
            headers: dict[str, Any] = {}
            if _instrument.ENABLED:  # a publish span per event, ended by its confirm
                span = _instrument.publish_span(event, self.exchange, headers)
                with _instrument.use_trace_headers(parents[index] if parents else None):
                    span.__enter__()
                spans.append(span)
            properties.append(_event_properties(event, headers))
        #: index in the batch -> None (confirmed) or why it failed
        results: dict[int, DomainEventBrokerError | None] = {}
        deadline = time.monotonic() + config.timeout
        backoff = backoff_delays()

        def fail_the_rest(error: DomainEventBrokerError) -> None:
            for index in range(len(batch)):
                results.setdefault(index, error)

        with self._lock:
            idle = time.monotonic() - self._last_used
            while len(results) < len(batch):
                todo = [index for index in range(len(batch)) if index not in results]
                try:
                    self._open(deadline - time.monotonic())
                    self._send_batch(todo, batch, bodies, properties, results, deadline, mandatory)
                    self._last_used = time.monotonic()
                    self._recovery.on_connected()
                    continue
                except _NoConfirmInTime:
                    self._abort()
                    fail_the_rest(
                        BrokerUnavailableError(
                            f"publishing a batch of {len(batch)} to {config.display}: no "
                            f"confirm within {config.timeout:g}s (connection dropped)"
                        )
                    )
                    break
                except _ATTEMPT_ERRORS as exc:
                    final, last = self._sort_failure(exc, "publishing a batch")
                    if final is not None:
                        fail_the_rest(final)
                        break
                self._on_lost(last, idle)
                pause = backoff.next()
                if time.monotonic() + pause >= deadline:
                    fail_the_rest(
                        _chained(
                            BrokerUnavailableError(
                                f"publishing a batch to {config.display} failed within "
                                f"{config.timeout:g}s: {type(last).__name__}: {last}"
                            ),
                            last,
                        )
                    )
                    break
                log.debug("Publishing a batch failed (%r), retrying in %.2fs", last, pause)
                time.sleep(pause)
        for index, span in enumerate(spans):
            error = results.get(index)
            span.__exit__(type(error) if error else None, error, None)
        failed = [(batch[index], error) for index, error in sorted(results.items()) if error]
        if failed:
            confirmed = [batch[index] for index, error in sorted(results.items()) if not error]
            first = failed[0][1]
            raise BatchPublishError(
                f"{len(failed)} of {len(batch)} event(s) not confirmed; the first, "
                f"{failed[0][0].routing_key!r} (uuid {failed[0][0].uuid_string}): {first}",
                failed,
                confirmed,
            ) from first
        return batch

    def _send_batch(
        self,
        todo: list[int],
        batch: list[DomainEvent],
        bodies: list[bytes],
        properties: list[pika.BasicProperties],
        results: dict[int, DomainEventBrokerError | None],
        deadline: float,
        mandatory: bool,
    ) -> None:
        """Send the events at ``todo`` on the batch channel; wait for their confirms.

        Caller holds the lock and opened the connection. Writes the outcome
        of each confirmed or refused event into ``results``.
        """
        channel, confirms = self._open_batch_channel()
        confirms.start(batch, results)
        # pika's blocking adapter waits for each confirm in basic_publish; its
        # underlying channel (pika.channel.Channel) does not.
        impl = channel._impl
        low_water = MAX_IN_FLIGHT // 2
        for count, index in enumerate(todo, 1):
            if confirms.in_flight >= MAX_IN_FLIGHT:
                self._wait(channel, lambda: confirms.in_flight <= low_water, deadline)
            elif count % SEND_EVERY == 0:
                channel._flush_output()  # send what is buffered; take confirms in
            impl.basic_publish(
                exchange=self.exchange,
                routing_key=batch[index].routing_key,
                body=bodies[index],
                properties=properties[index],
                mandatory=mandatory,
            )
            confirms.sent(index)
        self._wait(channel, lambda: confirms.in_flight == 0, deadline)

    def _wait(self, channel: BlockingChannel, done: Callable[[], bool], deadline: float) -> None:
        """Process I/O on ``channel`` until ``done()``, at most until ``deadline``."""
        if done():
            return
        connection = channel.connection
        time_left = deadline - time.monotonic()
        if time_left <= 0:
            raise _NoConfirmInTime
        timer = connection.call_later(time_left, _nothing)  # wakes the I/O loop up
        try:
            channel._flush_output(lambda: done() or time.monotonic() >= deadline)
        finally:
            if connection.is_open:
                connection.remove_timeout(timer)
        if not done():
            raise _NoConfirmInTime

    def _open_batch_channel(self) -> tuple[BlockingChannel, _Confirms]:
        """The batch channel, opened in confirm mode if needed. Caller holds the lock."""
        if (
            self._batch_channel is not None
            and self._batch_channel.is_open
            and self._confirms is not None
        ):
            return self._batch_channel, self._confirms
        assert self._connection is not None
        channel = self._connection.channel()
        confirms = _Confirms()
        channel._impl.add_on_return_callback(confirms.on_return)
        channel._impl.confirm_delivery(
            ack_nack_callback=confirms.on_confirm, callback=confirms.on_select_ok
        )
        channel._flush_output(lambda: confirms.selected)
        self._batch_channel, self._confirms = channel, confirms
        return channel, confirms

    def _publish(
        self,
        body: bytes,
        routing_key: str,
        properties: pika.BasicProperties,
        mandatory: bool = False,
    ) -> None:
        assert self._config is not None
        deadline = time.monotonic() + self._config.timeout
        backoff = backoff_delays()
        with self._lock:
            idle = time.monotonic() - self._last_used
            while True:
                try:
                    self._open(deadline - time.monotonic())
                    assert self._channel is not None
                    self._channel.basic_publish(
                        exchange=self.exchange,
                        routing_key=routing_key,
                        body=body,
                        properties=properties,
                        mandatory=mandatory,
                    )
                    self._last_used = time.monotonic()
                    self._recovery.on_connected()
                    return
                except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
                    raise translate_pika_error(exc, f"publishing {routing_key!r}") from exc
                except _ATTEMPT_ERRORS as exc:
                    final, last = self._sort_failure(exc, f"publishing {routing_key!r}")
                    if final is not None:
                        raise final from final.__cause__
                self._on_lost(last, idle)
                pause = backoff.next()
                if time.monotonic() + pause >= deadline:
                    raise BrokerUnavailableError(
                        f"publishing {routing_key!r} to {self._config.display} failed within "
                        f"{self._config.timeout:g}s: {describe_error(last)}"
                    ) from last
                log.debug("Publishing %s failed (%r), retrying in %.2fs", routing_key, last, pause)
                time.sleep(pause)

    def _sort_failure(
        self, exc: BaseException, what: str
    ) -> tuple[DomainEventBrokerError | None, BaseException]:
        """Sort out what one failed publish attempt raised (both retry loops).

        Returns:
            ``(error, exc)`` when the publish must end with ``error`` (pika's
            error chained); ``(None, cause)`` when it may be retried after a
            reconnect, ``cause`` being pika's error behind it.
        """
        if isinstance(exc, DomainEventBrokerError):
            if isinstance(exc, BrokerUnavailableError):
                # Reconnecting failed; retry while time is left. (A refused
                # exchange is a PublishError from _open and ends here.)
                return None, exc.__cause__ or exc
            return exc, exc  # AuthenticationError, PublishError: final
        if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
            self._reset()
            return _chained(translate_pika_error(exc, what), exc), exc
        if (
            isinstance(exc, pika.exceptions.ChannelClosedByBroker)
            and exc.reply_code in _FATAL_CHANNEL_CODES
        ):
            self._reset()
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
        had_connection = self._connection is not None
        self._reset()
        if not had_connection or self._recovery.lost:
            return
        assert self._config is not None
        heartbeat = self._config.heartbeat
        expected = None
        if heartbeat is not None and idle > heartbeat:
            # An idle blocking connection sends no heartbeats, so the broker
            # closes it after a while: expected, not a fault.
            expected = f"Publisher connection was idle for {idle:.0f}s and is gone"
        self._recovery.on_lost(exc, expected=expected)

    # -- connection management ------------------------------------------------

    def _ensure_open(self) -> None:
        """Open connection and channel if needed. Caller holds the lock.

        Raises only library errors (see :meth:`_open`).
        """
        try:
            self._open()
        except CONNECTION_ERRORS as exc:
            assert self._config is not None
            raise translate_pika_error(exc, f"opening a channel on {self._config.display}") from exc

    def _open(self, time_left: float | None = None) -> None:
        """Open connection and channel if needed. Caller holds the lock.

        Raises:
            AuthenticationError, BrokerUnavailableError: from connecting.
            PublishError: the broker refused the exchange declaration.
            CONNECTION_ERRORS: the new connection or channel failed right away
                (the caller may retry).
        """
        if self._config is None:
            return
        if self._pid != _process_id:  # a fork; no getpid() system call per publish
            self._forget_after_fork()
        if self._channel is not None and self._channel.is_open:
            return
        self._reset()
        if time_left is not None and time_left <= 0:
            raise BrokerUnavailableError(f"no time left to connect to {self._config.display}")
        connection = connect(
            self._config,
            f"domain-event-broker publisher (pid {os.getpid()})",
            timeout=time_left,
        )
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.exchange_declare(
                exchange=self.exchange,
                exchange_type=self.exchange_type,
                durable=True,
                auto_delete=False,
            )
        except CONNECTION_ERRORS as exc:
            close_quietly(connection)
            if (
                isinstance(exc, pika.exceptions.ChannelClosedByBroker)
                and exc.reply_code in _FATAL_CHANNEL_CODES
            ):
                # e.g. 406: the exchange exists with another type or durability.
                raise PublishError(
                    f"declaring exchange {self.exchange!r} ({self.exchange_type}, durable): "
                    f"the broker closed the channel ({exc.reply_code} {exc.reply_text})"
                ) from exc
            raise
        self._connection = connection
        self._channel = channel
        self._last_used = time.monotonic()
        log.debug("Publisher connected to %s", self._config.display)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connection without using it."""
        if self._connection is not None:
            _abandoned.append(self._connection)
        self._connection = None
        self._channel = None
        self._batch_channel = None
        self._confirms = None
        self._pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._forget_after_fork()

    def _abort(self) -> None:
        """Drop a connection that does not answer, without the closing
        handshake (which would wait for an answer). Caller holds the lock."""
        connection, self._connection, self._channel = self._connection, None, None
        self._batch_channel = self._confirms = None
        if connection is None or not connection.is_open:
            return
        try:
            # pika has no public "abort": end the TCP stream under the
            # connection, then let the I/O loop notice (it raises the loss).
            connection._impl._terminate_stream(
                pika.exceptions.StreamLostError("no confirm in time: connection dropped")
            )
            connection.process_data_events(0)
        except Exception:  # the loss we just caused, or anything from a dead connection
            log.debug("Dropped a connection that did not answer", exc_info=True)

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._batch_channel = self._confirms = None
        close_quietly(connection)

    def close(self) -> None:
        """Close the connection. The publisher reconnects if used again."""
        with self._lock:
            if self._pid != os.getpid():
                self._forget_after_fork()
            self._reset()

    disconnect = close

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- capture_events() (domain_event_broker.testing) ---------------------------

#: The lists of the active ``capture_events()`` blocks, in any thread.
_captures: list[list[DomainEvent]] = []
_captures_lock = threading.Lock()


def _captured(event: DomainEvent) -> bool:
    """Record ``event`` in every active capture; whether there was one."""
    if not _captures:
        return False
    with _captures_lock:
        targets = list(_captures)
    for events in targets:
        events.append(event)
    return bool(targets)


# -- the shared publishers behind publish_domain_event ------------------------


class _PublisherPool:
    """The publishers :func:`publish_domain_event` uses for one broker.

    A thread checks one out for each publish and gives it back after the
    confirm, so threads publishing at the same moment each have their own
    connection. The pool grows on demand up to ``configure(max_connections=...)``;
    past it, threads wait (at most the timeout, then BrokerUnavailableError)
    for a publisher to be free.
    The most recently used publisher is handed out first, so that spare
    connections stay idle.
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self._idle: list[Publisher] = []
        self._all: list[Publisher] = []
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._waiting = 0

    def publish(self, event: DomainEvent, body: bytes, mandatory: bool = False) -> DomainEvent:
        publisher = self._check_out()
        try:
            return publisher._publish_event(event, body, None, mandatory)
        finally:
            self._check_in(publisher)

    @property
    def size(self) -> int:
        """How many publishers (each with at most one connection) the pool holds."""
        with self._lock:
            return len(self._all)

    def _check_out(self) -> Publisher:
        with self._lock:
            if self._idle:  # the usual case: no clock, no condition
                return self._idle.pop()
            deadline = time.monotonic() + self.config.timeout
            while True:
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < _config.max_connections():
                    publisher = Publisher(
                        list(self.config.urls),
                        timeout=self.config.timeout,
                        ssl_context=self.config.ssl_context,
                    )
                    self._all.append(publisher)
                    return publisher
                time_left = deadline - time.monotonic()
                if time_left <= 0:
                    raise BrokerUnavailableError(
                        f"no publishing connection to {self.config.display} was free within "
                        f"{self.config.timeout:g}s (all {len(self._all)} busy; see "
                        f"configure(max_connections=...))"
                    )
                self._waiting += 1
                try:
                    self._free.wait(time_left)
                finally:
                    self._waiting -= 1

    def _check_in(self, publisher: Publisher) -> None:
        with self._lock:
            if publisher in self._all:
                self._idle.append(publisher)
                if self._waiting:
                    self._free.notify()
                return
        publisher.close()  # the pool was closed meanwhile

    def close(self) -> None:
        with self._lock:
            publishers, self._all, self._idle = self._all, [], []
            self._free.notify_all()
        for publisher in publishers:
            publisher.close()


_shared: dict[BrokerConfig, _PublisherPool] = {}
_shared_lock = threading.Lock()


def _shared_pool(config: BrokerConfig) -> _PublisherPool:
    pool = _shared.get(config)
    if pool is None:
        with _shared_lock:
            pool = _shared.get(config)
            if pool is None:
                pool = _PublisherPool(config)
                _shared[config] = pool
    return pool


#: The default broker's resolved settings, with what they were resolved from.
_default_config: tuple[tuple[object, ...], BrokerConfig | None] | None = None


def _resolve(connection_settings: ConnectionSettings) -> BrokerConfig | None:
    """``_config.resolve``, remembered for the default settings (a publish's hot path)."""
    global _default_config  # noqa: PLW0603
    if not isinstance(connection_settings, _Unset):
        return _config.resolve(connection_settings)
    defaults = _config._defaults
    broker = defaults.broker
    if not isinstance(broker, (str, _Unset, type(None))):
        broker = tuple(broker)  # a list given to configure() may be changed later
    key = (
        os.environ.get(_config.ENVIRONMENT_VARIABLE),
        broker,
        defaults.timeout,
        defaults.ssl_context,
    )
    cached = _default_config
    if cached is not None and cached[0] == key:
        return cached[1]
    config = _config.resolve(connection_settings)
    _default_config = (key, config)
    return config


def close_shared_publishers() -> None:
    """Close the connections that :func:`publish_domain_event` keeps open.

    They are opened again when needed; this runs at interpreter exit.
    """
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.close()


def _reinit_after_fork() -> None:
    # The parent's locks may be held by threads that do not exist here, and
    # its pools may count publishers checked out by such threads.
    global _shared_lock, _captures_lock, _process_id, _default_config  # noqa: PLW0603
    _process_id = os.getpid()
    _default_config = None
    _captures_lock = threading.Lock()
    _shared_lock = threading.Lock()
    _shared.clear()
    for publisher in list(_live_publishers):
        publisher._after_fork_in_child()


atexit.register(close_shared_publishers)
os.register_at_fork(after_in_child=_reinit_after_fork)


def publish_domain_event(
    routing_key: str,
    data: Any,
    domain_object_id: str | None = None,
    uuid_string: str | None = None,
    timestamp: float | None = None,
    connection_settings: ConnectionSettings = UNSET,
    *,
    require_route: bool | _Unset = UNSET,
) -> DomainEvent:
    """Publish a domain event and wait until the broker confirmed it.

    Connections are opened on first use and reused by later calls, from any
    number of threads: per process and broker, one connection per thread
    publishing at the same moment, up to ``configure(max_connections=...)``
    (16 by default).

    Args:
        routing_key: ``<domain>.<event_type>``, e.g. ``user.registered``.
        data: the payload; must be JSON-serializable.
        domain_object_id: optional identifier of the domain object.
        uuid_string: the event's id; a new UUID4 when left out.
        timestamp: Unix seconds (UTC); now when left out.
        connection_settings: an AMQP URL or list of URLs; ``None`` sends
            nothing; left out: the configured default.
        require_route: raise :class:`~domain_event_broker.UnroutableError`
            when no queue is bound for ``routing_key`` (the broker returns
            the event instead of discarding it); default ``False``, see
            :func:`~domain_event_broker.configure`.

    Returns:
        The published :class:`DomainEvent`.

    Raises:
        ValueError: the routing key is empty, not a str, or over 255 bytes;
            the data is not strict JSON (NaN, infinity, too deep); the
            timestamp is not finite.
        TypeError: ``data`` is not JSON-serializable, ``uuid_string`` not a
            str, ``timestamp`` not a number.
        ConfigurationError: the URL is malformed.
        UnroutableError: ``require_route`` and no queue was bound.
        BrokerError: the broker did not confirm within the timeout.

    .. versionchanged:: 4.1
       ``require_route``; ``uuid_string``, ``timestamp`` and the data are
       checked before anything is sent.
    """
    event, body = new_event(routing_key, data, domain_object_id, uuid_string, timestamp)
    mandatory = _config.default_require_route(require_route)
    config = _resolve(connection_settings)
    if _captured(event) or config is None:
        return event
    return _shared_pool(config).publish(event, body.encode("utf-8"), mandatory)
