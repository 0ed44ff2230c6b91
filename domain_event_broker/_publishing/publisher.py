"""The publisher and the per-process pool behind :func:`publish_domain_event`.

:mod:`domain_event_broker.publish` is its public face and documents it.
"""

from __future__ import annotations

import atexit
import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Protocol

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import config as _config
from .._amqp.config import UNSET, BrokerConfig, ConnectionSettings, _Unset
from .._amqp.names import DEFAULT_EXCHANGE, DEFAULT_EXCHANGE_TYPE
from .._core import validate as _validate
from .._telemetry import otel as _instrument
from ..errors import (
    BatchPublishError,
    BrokerUnavailableError,
    DomainEventBrokerError,
    UnroutableError,
)
from ..events import DomainEvent, check_event, new_event, validate_routing_key
from .sender import Sender

__all__ = [
    "Publisher",
    "close_shared_publishers",
    "publish_domain_event",
    "publish_event_before",
    "publish_settings",
]

log = logging.getLogger(__name__)

#: delivery_mode for messages that survive a broker restart.
PERSISTENT: Final = 2


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


def _event_properties(
    event: DomainEvent, headers: dict[str, Any] | None = None
) -> pika.BasicProperties:
    """The AMQP properties of ``event``; ``headers`` (a dict of the caller's
    own, not copied) are sent when not empty."""
    return pika.BasicProperties(
        delivery_mode=PERSISTENT,
        content_type="application/json",
        message_id=event.uuid_string,
        timestamp=_amqp_timestamp(event.timestamp),
        headers=headers or None,
    )


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
        #: The connection, confirms and retries (``None``: no broker).
        self._sender: Sender | None = None
        if self._config is not None:
            self._sender = Sender(self._config, self.exchange, exchange_type)
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
        if self._sender is None:
            return None
        with self._sender.lock:
            self._sender.channel()
            return self._sender.link.connection

    @property
    def channel(self) -> BlockingChannel | None:
        """The underlying pika channel (opened if needed); ``None`` when the
        broker is disabled. Not thread-safe: prefer :meth:`publish`."""
        return None if self._sender is None else self._sender.channel()

    def connect(self) -> None:
        """Open the connection now instead of on first publish.

        Raises:
            BrokerError: the broker could not be reached in time.
        """
        if self._sender is not None:
            self._sender.channel()

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
        if self._sender is None:
            log.debug("No broker configured: not publishing %s", routing_key)
            return
        self._sender.send(body, routing_key, properties, mandatory)

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
        *,
        deadline: float | None = None,
    ) -> DomainEvent:
        if _captured(event, mandatory, self.exchange):
            return event
        if self._sender is None:
            log.debug("No broker configured: not publishing %r", event)
            return event
        sent_headers = dict(headers) if headers else {}
        with _instrument.publish_span(event, self.exchange, sent_headers):  # fills trace context
            self._sender.send(
                body,
                event.routing_key,
                _event_properties(event, sent_headers),
                mandatory,
                deadline=deadline,
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
        if not batch:
            return batch
        captured = _captured_batch(batch, mandatory, self.exchange)
        if captured is not None:
            refused = _batch_error(batch, captured)
            if refused is not None:
                raise refused
            return batch
        sender = self._sender
        if sender is None:
            log.debug("No broker configured: not publishing %d event(s)", len(batch))
            return batch
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
        results = sender.send_batch(batch, bodies, properties, mandatory)
        for index, span in enumerate(spans):
            error = results.get(index)
            span.__exit__(type(error) if error else None, error, None)
        batch_error = _batch_error(batch, results)
        if batch_error is not None:
            raise batch_error
        return batch

    def close(self) -> None:
        """Close the connection. The publisher reconnects if used again."""
        if self._sender is not None:
            self._sender.close()

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


def _batch_error(
    batch: Sequence[DomainEvent], results: Mapping[int, DomainEventBrokerError | None]
) -> BatchPublishError | None:
    """The error for a batch whose results (per index: ``None`` when
    confirmed) hold failures; ``None`` when every event was confirmed."""
    failed = [(batch[index], error) for index, error in sorted(results.items()) if error]
    if not failed:
        return None
    confirmed = [batch[index] for index, error in sorted(results.items()) if not error]
    first = failed[0][1]
    maybe = sum(bool(getattr(error, "maybe_delivered", False)) for _, error in failed)
    error = BatchPublishError(
        f"{len(failed)} of {len(batch)} event(s) not confirmed"
        + (f" ({maybe} of them may have reached the broker all the same)" if maybe else "")
        + f"; the first, {failed[0][0].routing_key!r} (uuid {failed[0][0].uuid_string}): {first}",
        failed,
        confirmed,
    )
    error.__cause__ = first  # as ``raise error from first``
    error.__suppress_context__ = True
    return error


# -- capture_events() and StubBroker (domain_event_broker.testing) ------------


class Router(Protocol):
    """Stands in for the broker while active (``StubBroker``): routes events."""

    def route(self, event: DomainEvent, mandatory: bool, exchange: str) -> None:
        """Route ``event``, published to ``exchange``, as that exchange would.

        Raises:
            UnroutableError: ``mandatory`` and no handler is bound for it.
        """


#: The lists of the active ``capture_events()`` blocks and the routers of
#: the active ``StubBroker``\ s, in any thread.
_captures: list[list[DomainEvent] | Router] = []
_captures_lock = threading.Lock()


def _captured(
    event: DomainEvent, mandatory: bool = False, exchange: str = DEFAULT_EXCHANGE
) -> bool:
    """Record ``event``, published to ``exchange``, in every active capture;
    whether there was one.

    Raises:
        UnroutableError: ``mandatory``, and an active ``StubBroker`` has no
            handler bound for the event (it is recorded nowhere).
    """
    if not _captures:
        return False
    with _captures_lock:
        targets = list(_captures)
    for target in targets:  # routers first: an unroutable event is not published
        if not isinstance(target, list):
            target.route(event, mandatory, exchange)
    for target in targets:
        if isinstance(target, list):
            target.append(event)
    return bool(targets)


def _captured_batch(
    batch: Sequence[DomainEvent], mandatory: bool, exchange: str
) -> dict[int, DomainEventBrokerError | None] | None:
    """:func:`_captured` for each event of a batch: per index, ``None`` or
    why it failed; ``None`` when nothing captures."""
    if not _captures:
        return None
    results: dict[int, DomainEventBrokerError | None] = {}
    for index, event in enumerate(batch):
        try:
            _captured(event, mandatory, exchange)
            results[index] = None
        except UnroutableError as exc:
            results[index] = exc
    return results


# -- the shared publishers behind publish_domain_event ------------------------


class _PublisherPool:
    """The publishers :func:`publish_domain_event` uses for one broker.

    One pool per broker (its URLs and SSL context), whatever the timeout:
    ``configure(max_connections=...)`` is a limit per broker URL. A thread
    checks one publisher out for each publish and gives it back after the
    confirm, so threads publishing at the same moment each have their own
    connection. The pool grows on demand up to that limit; past it, threads
    wait (at most the timeout, then BrokerUnavailableError) for a publisher
    to be free. When the timeout changes (``configure(timeout=...)``), the
    publishers opened with the old one are closed as they come back.
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

    def publish(
        self,
        event: DomainEvent,
        body: bytes,
        mandatory: bool = False,
        *,
        config: BrokerConfig | None = None,
        deadline: float | None = None,
    ) -> DomainEvent:
        """Publish with a publisher of ``config`` (default: the pool's).

        ``deadline`` (``time.monotonic()``), when given, bounds the wait for
        a free publisher and the publish, before the timeout does.
        """
        publisher = self._check_out(config or self.config, deadline)
        try:
            return publisher._publish_event(event, body, None, mandatory, deadline=deadline)
        finally:
            self._check_in(publisher)

    @property
    def size(self) -> int:
        """How many publishers (each with at most one connection) the pool holds."""
        with self._lock:
            return len(self._all)

    def _check_out(self, config: BrokerConfig, deadline: float | None) -> Publisher:
        stale: list[Publisher] = []
        try:
            with self._lock:
                if config != self.config:  # a new timeout: retire the old publishers
                    self.config = config
                    stale = [p for p in self._idle if p._config != config]
                    self._idle = [p for p in self._idle if p._config == config]
                    self._all = [p for p in self._all if p not in stale]
                if self._idle:  # the usual case: no clock, no condition
                    return self._idle.pop()
                time_limit = time.monotonic() + config.timeout
                if deadline is not None:
                    time_limit = min(time_limit, deadline)
                while True:
                    if self._idle:
                        return self._idle.pop()
                    if len(self._all) < _config.max_connections():
                        publisher = Publisher(
                            list(config.urls),
                            timeout=config.timeout,
                            ssl_context=config.ssl_context,
                        )
                        self._all.append(publisher)
                        return publisher
                    time_left = time_limit - time.monotonic()
                    if time_left <= 0:
                        raise BrokerUnavailableError(
                            f"no publishing connection to {config.display} was free within "
                            f"{config.timeout:g}s (all {len(self._all)} busy; see "
                            f"configure(max_connections=...))"
                        )
                    self._waiting += 1
                    try:
                        self._free.wait(time_left)
                    finally:
                        self._waiting -= 1
        finally:
            for publisher in stale:
                publisher.close()

    def _check_in(self, publisher: Publisher) -> None:
        with self._lock:
            if publisher in self._all:
                if publisher._config == self.config:
                    self._idle.append(publisher)
                    if self._waiting:
                        self._free.notify()
                    return
                self._all.remove(publisher)  # opened with an old timeout
                if self._waiting:
                    self._free.notify()
        publisher.close()  # the pool was closed, or the timeout changed, meanwhile

    def close(self) -> None:
        with self._lock:
            publishers, self._all, self._idle = self._all, [], []
            self._free.notify_all()
        for publisher in publishers:
            publisher.close()

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's threads may have held the lock, and
        the publishers they had checked out never come back here."""
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._waiting = 0
        self._idle, self._all = [], []


#: The pools, by broker: its URLs and SSL context (not the timeout).
_shared: dict[tuple[tuple[str, ...], ssl.SSLContext | None], _PublisherPool] = {}
_shared_lock = threading.Lock()


def _shared_pool(config: BrokerConfig) -> _PublisherPool:
    key = (config.urls, config.ssl_context)
    pool = _shared.get(key)
    if pool is None:
        with _shared_lock:
            pool = _shared.get(key)
            if pool is None:
                pool = _PublisherPool(config)
                _shared[key] = pool
    return pool


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
    global _shared_lock, _captures_lock  # noqa: PLW0603
    _captures_lock = threading.Lock()
    _shared_lock = threading.Lock()
    for pool in list(_shared.values()):
        pool.after_fork_in_child()  # in case a caller still holds one
    _shared.clear()
    for publisher in list(_live_publishers):
        if publisher._sender is not None:
            publisher._sender.after_fork_in_child()


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
    config, mandatory = publish_settings(connection_settings, require_route)
    if _captured(event, mandatory) or config is None:
        return event
    return _shared_pool(config).publish(event, body.encode("utf-8"), mandatory, config=config)


def publish_event_before(
    event: DomainEvent, body: bytes, config: BrokerConfig | None, mandatory: bool, deadline: float
) -> DomainEvent:
    """Publish an event that :func:`~domain_event_broker.events.new_event` built
    (``body`` encoded), as :func:`publish_domain_event` does, but give up at
    ``deadline`` (``time.monotonic()``) if the timeout has not ended it
    before: ``publish_on_commit`` bounds a transaction's events by one deadline.

    Raises:
        BrokerError: as :func:`publish_domain_event`; ``BrokerUnavailableError``
            also when ``deadline`` passed.
    """
    if _captured(event, mandatory) or config is None:
        return event
    return _shared_pool(config).publish(event, body, mandatory, config=config, deadline=deadline)


def publish_settings(
    connection_settings: ConnectionSettings = UNSET, require_route: bool | _Unset = UNSET
) -> tuple[BrokerConfig | None, bool]:
    """The broker (``None``: publishing is disabled) and whether an
    unroutable event raises, from :func:`publish_domain_event`'s arguments
    and the defaults as they are now; ``publish_on_commit`` checks its own
    with it when called.

    Raises:
        TypeError: ``require_route`` is not a bool.
        ConfigurationError: ``connection_settings`` is malformed.
    """
    mandatory = _config.default_require_route(require_route)
    return _config.resolve(connection_settings), mandatory
