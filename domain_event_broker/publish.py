"""Publishing domain events with publisher confirms over a reused connection."""

from __future__ import annotations

import atexit
import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from . import _config, _instrument, _validate
from ._config import UNSET, BrokerConfig, ConnectionSettings, _Unset
from ._connection import CONNECTION_ERRORS, backoff_delays, close_quietly, connect
from ._names import DEFAULT_EXCHANGE, DEFAULT_EXCHANGE_TYPE
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    PublishError,
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
        self._pid = os.getpid()
        #: When the connection was lost, until publishing works again.
        self._lost_since: float | None = None
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
            properties = pika.BasicProperties(
                delivery_mode=PERSISTENT,
                content_type="application/json",
                message_id=event.uuid_string,
                timestamp=_amqp_timestamp(event.timestamp),
                headers=sent_headers or None,
            )
            self._publish(body, event.routing_key, properties, mandatory)
        return event

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
                    if self._lost_since is not None:
                        log.info(
                            "Publisher reconnected to %s after %.1fs",
                            self._config.display,
                            time.monotonic() - self._lost_since,
                        )
                        self._lost_since = None
                        _instrument.record_reconnect("publisher")
                    return
                except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
                    raise translate_pika_error(exc, f"publishing {routing_key!r}") from exc
                except pika.exceptions.ConnectionBlockedTimeout as exc:
                    self._reset()
                    raise translate_pika_error(exc, f"publishing {routing_key!r}") from exc
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code in _FATAL_CHANNEL_CODES:
                        self._reset()
                        raise PublishError(
                            f"publishing {routing_key!r} to exchange {self.exchange!r}: "
                            f"the broker closed the channel ({exc.reply_code} {exc.reply_text})"
                        ) from exc
                    last: BaseException = exc
                except AuthenticationError:
                    raise
                except BrokerUnavailableError as exc:
                    # Reconnecting failed; retry while time is left. (A refused
                    # exchange is a PublishError from _open and ends here.)
                    # Chain pika's error, not our wrapper of it.
                    last = exc.__cause__ or exc
                except CONNECTION_ERRORS as exc:
                    last = exc
                self._on_lost(last, idle)
                pause = backoff.next()
                if time.monotonic() + pause >= deadline:
                    raise BrokerUnavailableError(
                        f"publishing {routing_key!r} to {self._config.display} failed within "
                        f"{self._config.timeout:g}s: {describe_error(last)}"
                    ) from last
                log.debug("Publishing %s failed (%r), retrying in %.2fs", routing_key, last, pause)
                time.sleep(pause)

    def _on_lost(self, exc: BaseException, idle: float) -> None:
        """Drop the connection; log one warning per lost connection.

        ``idle``: seconds the connection had been unused before this publish.
        Caller holds the lock.
        """
        had_connection = self._connection is not None
        self._reset()
        if had_connection and self._lost_since is None:
            self._lost_since = time.monotonic()
            assert self._config is not None
            heartbeat = self._config.heartbeat
            if heartbeat is not None and idle > heartbeat:
                # An idle blocking connection sends no heartbeats, so the
                # broker closes it after a while: expected, not a fault.
                log.info(
                    "Publisher connection was idle for %.0fs and is gone (%s); reconnecting",
                    idle,
                    type(exc).__name__,
                )
                return
            log.warning(
                "Publisher lost the connection to the broker (%s: %s); reconnecting",
                type(exc).__name__,
                exc,
            )

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
        if self._pid != os.getpid():
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
        self._pid = os.getpid()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.RLock()
        self._forget_after_fork()

    def _reset(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
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

_shared: dict[BrokerConfig, Publisher] = {}
_shared_lock = threading.Lock()


def _shared_publisher(config: BrokerConfig) -> Publisher:
    publisher = _shared.get(config)
    if publisher is None:
        with _shared_lock:
            publisher = _shared.get(config)
            if publisher is None:
                publisher = Publisher(list(config.urls), timeout=config.timeout)
                _shared[config] = publisher
    return publisher


def close_shared_publishers() -> None:
    """Close the connections that :func:`publish_domain_event` keeps open."""
    with _shared_lock:
        publishers = list(_shared.values())
        _shared.clear()
    for publisher in publishers:
        publisher.close()


def _reinit_after_fork() -> None:
    # The parent's locks may be held by threads that do not exist here.
    global _shared_lock, _captures_lock  # noqa: PLW0603
    _captures_lock = threading.Lock()
    _shared_lock = threading.Lock()
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

    The connection is opened on first use and reused by later calls (per
    process and per broker), from any number of threads.

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
    config = _config.resolve(connection_settings)
    if _captured(event) or config is None:
        return event
    return _shared_publisher(config)._publish_event(event, body.encode("utf-8"), None, mandatory)
