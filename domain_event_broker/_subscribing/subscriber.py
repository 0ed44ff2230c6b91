"""The :class:`Subscriber`: registering handlers and running the consuming loop.

:mod:`domain_event_broker.subscribe` is its public face and documents it.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol

import pika
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import config as _config
from .._amqp import names as _names
from .._amqp.config import UNSET, BrokerConfig, ConnectionSettings, _Unset
from .._amqp.connect import CONNECTION_ERRORS
from .._amqp.failures import translate_pika_error
from .._amqp.link import Link
from .._core.signals import graceful_stop
from ..errors import ConfigurationError
from . import topology as _topology
from .registration import Handler, Registration, build_registration

if TYPE_CHECKING:
    from .consume_loop import ConsumeLoop

__all__ = ["DEFAULT_PREFETCH_COUNT", "StubConsumer", "Subscriber"]

log = logging.getLogger(__name__)


class StubConsumer(Protocol):
    """One Subscriber's side of a test double that stands in for the broker."""

    def register(self, registration: Registration) -> None:
        """Take ``registration`` instead of declaring its queues."""

    def consume(self, deadline: float | None) -> None:
        """Run this Subscriber's handlers (what ``start_consuming()`` does)."""

    def stop(self) -> None:
        """What ``stop_consuming()`` does."""


#: Test doubles (:class:`domain_event_broker.testing.StubBroker`) that take
#: registrations instead of a broker: each makes, for a Subscriber's first
#: registration, the consumer that stands in for the broker from then on;
#: it is given the Subscriber's exchange.
registration_hooks: list[Callable[[str], StubConsumer]] = []

#: How many unacknowledged events the broker sends ahead of each handler.
#: Handlers still run one at a time, in order; a larger window only saves
#: round trips. Enough for the events of one read to reach the worker thread
#: together while the broker sends the next (with 20, a quick handler ran at
#: two thirds of the rate here), small enough that a busy worker holds little
#: back from others on the same queue.
DEFAULT_PREFETCH_COUNT: Final = 100


class Subscriber:
    """Receives domain events and dispatches them to registered handlers.

    Register handlers with :meth:`register`, then call
    :meth:`start_consuming`. Each handler gets its own durable queue, named
    after it, so events wait for it while the worker is down.

    Args:
        connection_settings: an AMQP URL, a list of URLs of one cluster,
            ``None`` to disable (nothing is declared or consumed), or left
            out for the configured default.
        exchange: the exchange events are published to.
        exchange_type: its type.
        prefetch_count: how many events the broker sends ahead per handler;
            handlers still run one at a time, in order. Default 100.
        timeout: seconds to wait for the broker when connecting in
            :meth:`register` (default 30). While consuming, the subscriber
            reconnects for as long as it runs.
        ssl_context: the :class:`ssl.SSLContext` for ``amqps://`` URLs
            (default: as for :class:`~domain_event_broker.Publisher`).

    Raises:
        ConfigurationError: a URL is malformed.
        ValueError: ``prefetch_count`` is not a positive int.
    """

    def __init__(
        self,
        connection_settings: ConnectionSettings = UNSET,
        exchange: str = _names.DEFAULT_EXCHANGE,
        exchange_type: str = _names.DEFAULT_EXCHANGE_TYPE,
        *,
        prefetch_count: int = DEFAULT_PREFETCH_COUNT,
        timeout: float | _Unset = UNSET,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
            raise ValueError(f"prefetch_count must be an int, not {prefetch_count!r}")
        if not 0 < prefetch_count <= 65535:
            raise ValueError(f"prefetch_count must be between 1 and 65535, not {prefetch_count}")
        self._config: BrokerConfig | None = _config.resolve(
            connection_settings, timeout, UNSET if ssl_context is None else ssl_context
        )
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.prefetch_count = prefetch_count
        self._registrations: list[Registration] = []
        #: Handlers whose topology is declared on the link's current channel.
        self._declared: set[str] = set()
        self._declared_generation = -1
        self._link: Link | None = None
        self._loop: ConsumeLoop | None = None
        self._lock = threading.Lock()
        self._stub: StubConsumer | None = None
        self._stub_hook: Callable[[str], StubConsumer] | None = None
        self._tick_callbacks: list[Callable[[float], object]] = []

    def __repr__(self) -> str:
        where = "no broker" if self._config is None else self._config.display
        handlers = ", ".join(r.name for r in self._registrations)
        return f"<Subscriber {where} handlers=[{handlers}]>"

    # -- 3.0.2 compatibility: lazily connecting pika objects ---------------

    @property
    def connection_settings(self) -> str | None:
        """The broker URLs (password hidden), or ``None`` when disabled."""
        return None if self._config is None else self._config.display

    @property
    def connection(self) -> pika.BlockingConnection | None:
        """The pika connection (opened if needed); ``None`` when disabled.

        Only for use from the thread that consumes, or before consuming.
        """
        if self._open_channel() is None:
            return None
        assert self._link is not None
        return self._link.connection

    @property
    def channel(self) -> BlockingChannel | None:
        """The pika channel (opened if needed); ``None`` when disabled.

        Only for use from the thread that consumes, or before consuming.
        """
        return self._open_channel()

    def _get_link(self) -> Link | None:
        if self._config is None:
            return None
        if self._link is None:
            self._link = Link(
                self._config,
                "domain-event-broker subscriber",
                # While consuming, a stop request ends a reconnection attempt.
                should_stop=lambda: self._loop is not None and self._loop.stop_requested,
            )
        return self._link

    def _open_channel(self) -> BlockingChannel | None:
        link = self._get_link()
        if link is None:
            return None
        try:
            channel = link.channel()
        except CONNECTION_ERRORS as exc:  # pragma: no cover - Link translates
            raise translate_pika_error(exc, "opening a channel") from exc
        if self._declared_generation != link.generation:
            self._declared.clear()
            self._declared_generation = link.generation
        return channel

    # -- registration ------------------------------------------------------------

    def register(
        self,
        handler: Handler,
        name: str,
        binding_keys: Sequence[str],
        dead_letter: bool = False,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        max_retries: int = 0,
        *,
        concurrency: int = 1,
        queue_type: str | None = None,
    ) -> None:
        """Register ``handler`` for the events matching ``binding_keys``.

        Declares the handler's whole topology on the broker at once: the
        queue ``name`` bound to the events exchange and to ``name-retry``;
        with ``dead_letter``, the exchange ``name-dlx`` and the queue
        ``name-dl``. Names and arguments are those of 3.0.2, so queues it
        declared are taken over as they are.

        May be called while :meth:`start_consuming` runs, from any thread
        (a handler included): the handler is declared and consumed from
        the consuming thread, and this returns once it is.

        Args:
            handler: called with each :class:`DomainEvent`; raise
                :class:`Retry` to retry later, anything else to dead-letter.
            name: the handler's name; used as its queue name.
            binding_keys: routing keys to receive, wildcards allowed
                (``user.*``, ``#``).
            dead_letter: keep failed events in ``name-dl`` for replay.
            durable: whether the queue survives a broker restart. RabbitMQ
                4.3 and later refuse ``durable=False`` by default unless
                ``exclusive`` is true too (:class:`ConfigurationError`).
            exclusive: whether the queue is private to this connection.
            auto_delete: whether the queue is deleted with its last consumer.
            max_retries: how many :class:`Retry` requests are honoured before
                the event is dead-lettered (or discarded).
            concurrency: how many events of this handler run at once, each
                on its own thread (default 1: one at a time, in queue order).
                Above 1, events are handled out of order.

                .. versionadded:: 4.1
            queue_type: ``"classic"`` or ``"quorum"`` for the handler's queue,
                dead-letter queue and delay queues; ``None``: the configured
                default, else the broker's (see :doc:`cluster`). An existing
                queue of the other type is taken over as it is, with a
                WARNING. *Added in 4.1.*

        Raises:
            TypeError: ``handler`` is not callable.
            ValueError: empty ``name``, no binding keys, negative
                ``max_retries``, ``concurrency`` below 1, or a name already
                registered.
            SubscriberStoppingError: called while consuming, once the
                subscriber is stopping (raised at once; nothing is declared).
            ConfigurationError: the queue exists with other arguments,
                ``name`` is reserved by RabbitMQ (``amq.`` prefix), or the
                broker refuses a non-durable queue that is not exclusive.
            BrokerError: the broker could not be reached.
        """
        registration = build_registration(
            handler,
            name,
            binding_keys,
            dead_letter,
            durable,
            exclusive,
            auto_delete,
            max_retries,
            concurrency,
            queue_type,
        )
        with self._lock:
            if any(r.name == registration.name for r in self._registrations):
                raise ValueError(f"a handler named {registration.name!r} is already registered")
            if registration_hooks:
                if self._stub_hook is not registration_hooks[-1]:
                    self._stub_hook = registration_hooks[-1]
                    self._stub = self._stub_hook(self.exchange)
                assert self._stub is not None
                self._stub.register(registration)
                self._registrations.append(registration)
                return
            if self._config is None:
                log.debug("No broker configured: handler %s is not registered", name)
                return
            loop = self._loop
            if loop is None:
                self._declare_now(registration)
                self._registrations.append(registration)
                return
        loop.add(registration, self._config.timeout)

    def _declare_now(self, registration: Registration) -> None:
        try:
            channel = self._open_channel()
            assert channel is not None
            _topology.declare_handler(channel, registration, self.exchange, self.exchange_type)
            self._declared.add(registration.name)
        except CONNECTION_ERRORS as exc:
            self._drop_connection()
            raise translate_pika_error(
                exc, f"declaring the queues of {registration.name!r}"
            ) from exc
        except BaseException:
            if self._link is not None and not self._link.is_open:
                self._drop_connection()
            raise

    # -- connection --------------------------------------------------------------

    def _drop_connection(self) -> None:
        self._declared.clear()
        if self._link is not None:
            self._link.drop()

    def close(self) -> None:
        """Close the connection; when consuming, stop (as :meth:`stop_consuming`)."""
        if self._loop is not None:
            self.stop_consuming()
        else:
            self._drop_connection()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- consuming ---------------------------------------------------------------

    def start_consuming(self, timeout: float | None = None) -> None:
        """Receive events and run the handlers until stopped.

        Blocks until :meth:`stop_consuming` is called (from any thread or a
        handler), ``timeout`` seconds have passed, or, when called in the main
        thread, SIGTERM or SIGINT arrives. Stopping is graceful: running
        handlers finish and their events are acknowledged (or moved to their
        retry or dead-letter destination); events received but not started
        are returned to the queue. A second signal stops at once (exit status
        128 + the signal's number), leaving the running event for redelivery.
        A lost connection is reopened and consuming resumes.

        Args:
            timeout: stop after this many seconds (``None``: run until
                stopped; ``0``: return promptly).

        Raises:
            ValueError: ``timeout`` is negative or not a number.
            AuthenticationError: the broker refused the credentials.
            ConfigurationError: a queue exists with other arguments.
            HandlerThreadError: a handler thread died (a bug); unacknowledged
                events are redelivered.
            SystemExit, KeyboardInterrupt: raised by a handler; re-raised
                here after a graceful stop (that event is redelivered).
        """
        deadline = _deadline(timeout)
        if self._stub is not None:
            self._stub.consume(deadline)
            return
        if self._config is None:
            log.debug("No broker configured: start_consuming() returns at once")
            return
        with self._lock:
            if not self._registrations:
                raise ConfigurationError("register() a handler before start_consuming()")
            if self._loop is not None:
                raise RuntimeError("this Subscriber is already consuming")
            link = self._get_link()
            assert link is not None
            if self._declared_generation != link.generation:
                self._declared.clear()
            # The consuming machinery (handler threads, dispatch, settling)
            # is loaded by the first start_consuming(), not by importing the
            # package: a process that only publishes never needs it.
            from .consume_loop import ConsumeLoop  # noqa: PLC0415

            loop = ConsumeLoop(
                link,
                self._registrations,
                self._declared,
                self.exchange,
                self.exchange_type,
                self.prefetch_count,
                self._tick_callbacks,
            )
            self._loop = loop

        def force() -> None:
            loop.forced = True

        try:
            with graceful_stop(loop.request_stop, on_force=force):
                loop.run(deadline)
        finally:
            with self._lock:
                self._loop = None
            self._drop_connection()
        if loop.stop_error is not None:
            raise loop.stop_error

    def add_tick_callback(self, callback: Callable[[float], object]) -> None:
        """Have ``callback`` called regularly while consuming and connected.

        The consuming thread calls it after every poll (at least every 0.2 s)
        with how long the longest-running handler call has run so far, in
        seconds (0 when idle). A health check uses it: no calls means the
        worker is disconnected or its loop is stuck; a large value means a
        handler is stuck. Exceptions it raises are logged and ignored.

        Args:
            callback: takes the busy time; keep it fast.

        .. versionadded:: 4.1
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        self._tick_callbacks.append(callback)

    def stop_consuming(self) -> None:
        """Stop consuming gracefully. Safe from any thread and from a handler.

        Returns at once; :meth:`start_consuming` returns once the running
        handlers finished and their outcomes were carried out. When not
        consuming, closes the connection (as 3.0.2 did).
        """
        if self._stub is not None:
            self._stub.stop()
            return
        loop = self._loop
        if loop is None:
            self._drop_connection()
            return
        loop.request_stop()


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
    if math.isinf(timeout):
        return None
    return time.monotonic() + timeout
