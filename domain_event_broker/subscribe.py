"""Receiving domain events: per-handler queues, delayed retries, dead letters.

Threading model: the thread that calls :meth:`Subscriber.start_consuming`
is the I/O thread; it alone touches the pika connection and channel. Handlers
run one at a time, in delivery order, on a worker thread, so heartbeats keep
flowing while a handler is busy. The worker hands each outcome (acknowledge,
retry later, dead-letter) back to the I/O thread, which carries it out:
retries and dead letters are published with confirms *before* the original
delivery is acknowledged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Final

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from . import _config, _headers, _names, _topology
from ._config import UNSET, BrokerConfig, ConnectionSettings, _Unset
from ._connection import CONNECTION_ERRORS, backoff_delays, close_quietly, connect
from ._registration import Handler, Registration, Retry
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigurationError,
    MalformedEventError,
    translate_pika_error,
)
from .events import DomainEvent

__all__ = ["Retry", "Subscriber"]

log = logging.getLogger(__name__)

#: How many unacknowledged events the broker sends ahead of the handler.
#: Handlers still run one at a time, in order; a larger window only saves
#: round trips.
DEFAULT_PREFETCH_COUNT: Final = 20

#: Longest time (seconds) the I/O loop waits for network events before it
#: looks at stop requests, deadlines and signals again.
POLL_INTERVAL: Final = 0.2

#: Signals that stop a worker gracefully when consuming in the main thread.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Delivery:
    generation: int
    registration: Registration
    delivery_tag: int
    routing_key: str
    redelivered: bool
    properties: pika.BasicProperties
    body: bytes


@dataclass
class _Outcome:
    """What the I/O thread must do with one delivery."""

    delivery: _Delivery
    action: str  # "ack", "retry", "dead_letter"
    delay_ms: int = 0
    headers: dict[str, Any] = field(default_factory=dict)


_STOP_WORKER: Final = object()


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
        prefetch_count: how many events the broker sends ahead; handlers
            still run one at a time, in order. Default 20.
        timeout: seconds to wait for the broker when connecting in
            :meth:`register` (default 30). While consuming, the subscriber
            reconnects for as long as it runs.

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
    ) -> None:
        if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
            raise ValueError(f"prefetch_count must be an int, not {prefetch_count!r}")
        if not 0 < prefetch_count <= 65535:
            raise ValueError(f"prefetch_count must be between 1 and 65535, not {prefetch_count}")
        self._config: BrokerConfig | None = _config.resolve(connection_settings, timeout)
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.prefetch_count = prefetch_count
        self._registrations: list[Registration] = []
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tags: dict[str, Registration] = {}
        self._consuming_on: BlockingChannel | None = None
        #: Handlers whose topology was declared on the current channel.
        self._declared: set[str] = set()
        self._cancelled: set[str] = set()
        self._generation = 0
        self._pid = os.getpid()
        # Stop requests may come from any thread and from signal handlers.
        self._stop_requested = False
        self._wakeup = threading.Event()
        self._consuming = False
        self._io_thread: threading.Thread | None = None
        # Worker state.
        self._work: queue.SimpleQueue[_Delivery | object] = queue.SimpleQueue()
        self._outcomes: deque[_Outcome] = deque()
        self._outcomes_lock = threading.Lock()
        self._drain_scheduled = False
        self._busy = False
        self._forced = False
        self._worker: threading.Thread | None = None

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
        self._ensure_channel()
        return self._connection

    @property
    def channel(self) -> BlockingChannel | None:
        """The pika channel (opened if needed); ``None`` when disabled.

        Only for use from the thread that consumes, or before consuming.
        """
        self._ensure_channel()
        return self._channel

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
        queue_type: str | None = None,
    ) -> None:
        """Register ``handler`` for the events matching ``binding_keys``.

        Declares the handler's whole topology on the broker at once: the
        queue ``name`` bound to the events exchange and to ``name-retry``;
        with ``dead_letter``, the exchange ``name-dlx`` and the queue
        ``name-dl``. Names and arguments are those of 3.0.2, so queues it
        declared are taken over as they are.

        Args:
            handler: called with each :class:`DomainEvent`; raise
                :class:`Retry` to retry later, anything else to dead-letter.
            name: the handler's name; used as its queue name.
            binding_keys: routing keys to receive, wildcards allowed
                (``user.*``, ``#``).
            dead_letter: keep failed events in ``name-dl`` for replay.
            durable: whether the queue survives a broker restart.
            exclusive: whether the queue is private to this connection.
            auto_delete: whether the queue is deleted with its last consumer.
            max_retries: how many :class:`Retry` requests are honoured before
                the event is dead-lettered (or discarded).
            queue_type: ``"classic"`` or ``"quorum"`` for the handler's queue,
                dead-letter queue and delay queues; ``None``: the configured
                default, else the broker's (see :doc:`cluster`). An existing
                queue of the other type is taken over as it is, with a
                WARNING. *Added in 4.1.*

        Raises:
            TypeError: ``handler`` is not callable.
            ValueError: empty ``name``, no binding keys, negative
                ``max_retries``, or a name already registered.
            ConfigurationError: the queue exists with other arguments.
            BrokerError: the broker could not be reached.
        """
        registration = self._validate(
            handler, name, binding_keys, dead_letter, durable, exclusive, auto_delete, max_retries
        )
        registration = dataclasses.replace(registration, queue_type=queue_type)
        if self._config is None:
            log.debug("No broker configured: handler %s is not registered", name)
            return
        self._registrations.append(registration)
        try:
            channel = self._ensure_channel()
            assert channel is not None
            self._declare(channel, registration)
        except CONNECTION_ERRORS as exc:
            self._registrations.remove(registration)
            self._drop_connection()
            raise translate_pika_error(exc, f"declaring the queues of {name!r}") from exc
        except BaseException:
            self._registrations.remove(registration)
            if self._channel is None or not self._channel.is_open:
                self._drop_connection()
            raise

    def _validate(
        self,
        handler: Handler,
        name: str,
        binding_keys: Sequence[str],
        dead_letter: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        max_retries: int,
    ) -> Registration:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty str")
        if len(name.encode("utf-8")) > 200:
            raise ValueError("name must be at most 200 bytes (derived queue names add suffixes)")
        if isinstance(binding_keys, str):
            raise ValueError("binding_keys must be a list of str, not one str")
        keys = tuple(binding_keys)
        if not keys:
            raise ValueError("binding_keys must hold at least one binding key")
        if not all(isinstance(key, str) and key for key in keys):
            raise ValueError("every binding key must be a non-empty str")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
        if any(r.name == name for r in self._registrations):
            raise ValueError(f"a handler named {name!r} is already registered")
        return Registration(
            handler=handler,
            name=name,
            binding_keys=keys,
            dead_letter=bool(dead_letter),
            durable=bool(durable),
            exclusive=bool(exclusive),
            auto_delete=bool(auto_delete),
            max_retries=max_retries,
        )

    def _declare(self, channel: BlockingChannel, registration: Registration) -> None:
        _topology.declare_handler(channel, registration, self.exchange, self.exchange_type)
        self._declared.add(registration.name)

    # -- connection --------------------------------------------------------------

    def _ensure_channel(self) -> BlockingChannel | None:
        if self._config is None:
            return None
        if self._pid != os.getpid():
            # A forked child never uses its parent's socket.
            self._connection = self._channel = None
            self._pid = os.getpid()
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._drop_connection()
        connection = connect(
            self._config,
            f"domain-event-broker subscriber (pid {os.getpid()})",
            # While consuming, a stop request ends a reconnection attempt.
            should_stop=lambda: self._consuming and self._stop_requested,
        )
        try:
            channel = connection.channel()
            channel.confirm_delivery()
        except CONNECTION_ERRORS as exc:
            close_quietly(connection)
            raise translate_pika_error(exc, "opening a channel") from exc
        self._connection = connection
        self._channel = channel
        return channel

    def _drop_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._consuming_on = None
        self._consumer_tags.clear()
        self._cancelled.clear()
        self._declared.clear()
        close_quietly(connection)

    def close(self) -> None:
        """Close the connection (when not consuming)."""
        if self._consuming:
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
        thread, SIGTERM or SIGINT arrives. Stopping is graceful: the running
        handler finishes and its event is acknowledged (or moved to its retry
        or dead-letter destination); events received but not started are
        returned to the queue. A lost connection is reopened and consuming
        resumes.

        Args:
            timeout: stop after this many seconds (``None``: run until stopped).

        Raises:
            AuthenticationError: the broker refused the credentials.
            ConfigurationError: a queue exists with other arguments.
        """
        if self._config is None:
            log.debug("No broker configured: start_consuming() returns at once")
            return
        if not self._registrations:
            raise ConfigurationError("register() a handler before start_consuming()")
        if self._consuming:
            raise RuntimeError("this Subscriber is already consuming")
        deadline = None if not timeout else time.monotonic() + timeout
        self._consuming = True
        self._stop_requested = False
        self._forced = False
        self._wakeup.clear()
        self._io_thread = threading.current_thread()
        previous_handlers = self._install_signal_handlers()
        self._start_worker()
        try:
            self._run(deadline)
        finally:
            self._stop_worker()
            self._drop_connection()
            self._restore_signal_handlers(previous_handlers)
            self._consuming = False
            self._io_thread = None

    def stop_consuming(self) -> None:
        """Stop consuming gracefully. Safe from any thread and from a handler.

        Returns at once; :meth:`start_consuming` returns once the running
        handler finished and its outcome was carried out. When not consuming,
        closes the connection (as 3.0.2 did).
        """
        if not self._consuming:
            if self._io_thread is None:
                self._drop_connection()
            return
        self._stop_requested = True
        self._wakeup.set()
        self._wake_io_thread()

    def _wake_io_thread(self) -> None:
        connection = self._connection
        if connection is None or threading.current_thread() is self._io_thread:
            return
        try:
            connection.add_callback_threadsafe(_noop)
        except Exception:  # a closed connection: the loop polls anyway
            log.debug("Could not wake the I/O thread", exc_info=True)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if self._stop_requested:
                # A second signal: stop now. The running event is not
                # acknowledged; the broker delivers it again.
                self._forced = True
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            # Only set flags: the I/O loop notices within POLL_INTERVAL.
            log.info("Received signal %d: stopping after the running handler", signum)
            self._stop_requested = True
            self._wakeup.set()

        previous: dict[int, Any] = {}
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _run(self, deadline: float | None) -> None:
        backoff = backoff_delays()
        lost_since: float | None = None
        while not self._stop_requested:
            if deadline is not None and time.monotonic() >= deadline:
                self._stop_requested = True
                break
            try:
                self._ensure_consuming()
                if lost_since is not None:
                    log.info(
                        "Reconnected to %s after %.1fs; consuming again",
                        self._config.display if self._config else "?",
                        time.monotonic() - lost_since,
                    )
                    lost_since = None
                    backoff = backoff_delays()
                assert self._connection is not None
                limit = POLL_INTERVAL
                if deadline is not None:
                    limit = max(0.0, min(limit, deadline - time.monotonic()))
                self._connection.process_data_events(time_limit=limit)
                self._drain_outcomes()
                _raise_if_closed(self._channel)
            except (AuthenticationError, ConfigurationError):
                raise
            except (BrokerUnavailableError, *CONNECTION_ERRORS) as exc:
                if lost_since is None:
                    lost_since = time.monotonic()
                    log.warning(
                        "Lost the connection to the broker (%s: %s); reconnecting%s",
                        type(exc).__name__,
                        exc,
                        _hint(exc),
                    )
                else:
                    log.debug("Reconnecting failed: %r", exc)
                self._on_connection_lost()
                pause = backoff.next()
                if deadline is not None:
                    pause = max(0.0, min(pause, deadline - time.monotonic()))
                self._wakeup.wait(pause)
        self._shutdown()

    def _ensure_consuming(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open or self._consuming_on is not channel:
            if channel is None or not channel.is_open:
                self._on_connection_lost()
            channel = self._ensure_channel()
            assert channel is not None
            channel.basic_qos(prefetch_count=self.prefetch_count)
            channel.add_on_cancel_callback(self._on_cancelled_by_broker)
            for registration in self._registrations:
                if registration.name not in self._declared:  # register() did it already
                    self._declare(channel, registration)
                self._consume(channel, registration)
            self._consuming_on = channel
        elif self._cancelled:
            for tag in list(self._cancelled):
                self._cancelled.discard(tag)
                cancelled = self._consumer_tags.pop(tag, None)
                if cancelled is None:
                    continue  # not one of ours (any more)
                registration = cancelled
                log.warning(
                    "The broker cancelled the consumer of %s (queue deleted?); declaring it again",
                    registration.name,
                )
                self._declare(channel, registration)
                self._consume(channel, registration)

    def _consume(self, channel: BlockingChannel, registration: Registration) -> None:
        generation = self._generation

        def on_message(
            _channel: BlockingChannel,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            self._work.put(
                _Delivery(
                    generation=generation,
                    registration=registration,
                    delivery_tag=method.delivery_tag,
                    routing_key=method.routing_key,
                    redelivered=bool(method.redelivered),
                    properties=properties,
                    body=body,
                )
            )

        tag = channel.basic_consume(queue=registration.name, on_message_callback=on_message)
        self._consumer_tags[tag] = registration

    def _on_cancelled_by_broker(self, method_frame: Any) -> None:
        self._cancelled.add(method_frame.method.consumer_tag)

    def _on_connection_lost(self) -> None:
        """Forget the connection and everything tied to its delivery tags."""
        self._generation += 1
        self._drop_connection()
        while True:  # deliveries not started: the broker redelivers them
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is _STOP_WORKER:
                self._work.put(item)
                break
        with self._outcomes_lock:
            self._outcomes.clear()

    def _shutdown(self) -> None:
        """Graceful stop: no new deliveries, finish the running handler."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        try:
            for tag in list(self._consumer_tags):
                channel.basic_cancel(tag)
            self._consumer_tags.clear()
            # Events received but not started (the worker skips them once
            # a stop is requested) go back to the queue on close.
            while not self._worker_idle():
                assert self._connection is not None
                self._connection.process_data_events(time_limit=POLL_INTERVAL)
                self._drain_outcomes()
            self._drain_outcomes()
        except CONNECTION_ERRORS as exc:
            log.warning(
                "Lost the connection while stopping (%s); unacknowledged events "
                "will be redelivered",
                exc,
            )

    def _worker_idle(self) -> bool:
        with self._outcomes_lock:
            return not self._busy and not self._outcomes

    # -- worker thread -------------------------------------------------------------

    def _start_worker(self) -> None:
        self._worker = threading.Thread(
            target=self._work_loop, name="domain-event-broker-worker", daemon=True
        )
        self._worker.start()

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        self._generation += 1  # anything still queued is skipped
        self._work.put(_STOP_WORKER)
        # After a forced stop the handler may be stuck: the worker thread is
        # a daemon and must not keep the process alive.
        worker.join(timeout=1.0 if self._forced else None)

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP_WORKER:
                return
            assert isinstance(item, _Delivery)
            with self._outcomes_lock:
                if item.generation != self._generation or self._stop_requested:
                    continue  # its channel is gone; the broker redelivers it
                self._busy = True
            try:
                outcome = self._handle(item)
            finally:
                with self._outcomes_lock:
                    self._busy = False
                    if outcome is not None:
                        self._outcomes.append(outcome)
                    schedule = not self._drain_scheduled
                    self._drain_scheduled = True
            if schedule:
                self._schedule_drain()

    def _schedule_drain(self) -> None:
        connection = self._connection
        try:
            if connection is not None:
                connection.add_callback_threadsafe(self._drain_outcomes)
        except Exception:  # closed: the I/O loop drains after each poll
            log.debug("Could not schedule the outcome drain", exc_info=True)

    def _handle(self, delivery: _Delivery) -> _Outcome | None:
        """Run the handler for one delivery (worker thread); return its outcome."""
        registration = delivery.registration
        headers = dict(delivery.properties.headers or {})
        try:
            text = delivery.body.decode("utf-8")
            event = DomainEvent.from_json(text)
        except (UnicodeDecodeError, MalformedEventError) as exc:
            error: BaseException = (
                exc
                if isinstance(exc, MalformedEventError)
                else MalformedEventError(f"the body is not UTF-8: {exc}")
            )
            return self._failure(
                delivery, error, "", retries=_headers.retry_count(headers), malformed=True
            )
        event.retries = _headers.retry_count(headers)
        event.redelivered = delivery.redelivered
        try:
            registration.handler(event)
        except Retry as request:
            if event.retries < registration.max_retries:
                log.info(
                    "Retry %d/%d of %s %s by %s in %.3fs",
                    event.retries + 1,
                    registration.max_retries,
                    event.routing_key,
                    event.uuid_string,
                    registration.name,
                    request.delay,
                )
                return _Outcome(
                    delivery,
                    "retry",
                    delay_ms=_names.delay_ms(request.delay),
                    headers={_headers.RETRY_COUNT: event.retries + 1},
                )
            return self._failure(
                delivery, request, traceback.format_exc(), retries=event.retries, exceeded=True
            )
        except Exception as exc:  # noqa: BLE001  # any handler error is dead-lettered
            return self._failure(delivery, exc, traceback.format_exc(), retries=event.retries)
        except BaseException as exc:  # noqa: BLE001  # SystemExit etc.: stop, keep the event
            # SystemExit or KeyboardInterrupt raised inside a handler: leave
            # the event for redelivery and stop this subscriber.
            log.error(
                "Handler %s raised %s; stopping; the event will be redelivered",
                registration.name,
                type(exc).__name__,
            )
            self.stop_consuming()
            return None
        log.debug("Handled %s %s by %s", event.routing_key, event.uuid_string, registration.name)
        return _Outcome(delivery, "ack")

    def _failure(
        self,
        delivery: _Delivery,
        exc: BaseException,
        formatted_traceback: str,
        *,
        retries: int,
        malformed: bool = False,
        exceeded: bool = False,
    ) -> _Outcome:
        registration = delivery.registration
        exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        if exceeded:
            message = f"gave up after max_retries={registration.max_retries} retries"
        else:
            message = str(exc)
        what = "a malformed message" if malformed else "an event"
        if registration.dead_letter:
            log.error(
                "Handler %s failed on %s (routing key %s): %s: %s; dead-lettered to %s",
                registration.name,
                what,
                delivery.routing_key,
                exc_type,
                message,
                _names.dead_letter_queue(registration.name),
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            headers = {
                _headers.EXCEPTION_TYPE: exc_type,
                _headers.EXCEPTION_MESSAGE: _headers.truncate(message, _headers.MAX_MESSAGE_CHARS),
                _headers.EXCEPTION_TRACEBACK: _headers.truncate(
                    formatted_traceback, _headers.MAX_TRACEBACK_CHARS
                ),
                _headers.FAILED_HANDLER: registration.name,
                _headers.FAILED_AT: int(time.time()),
                _headers.RETRY_COUNT: retries,
            }
            return _Outcome(delivery, "dead_letter", headers=headers)
        log.error(
            "Handler %s failed on %s (routing key %s): %s: %s; discarded (no dead-letter queue)",
            registration.name,
            what,
            delivery.routing_key,
            exc_type,
            message,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return _Outcome(delivery, "ack")

    # -- carrying out outcomes (I/O thread) -----------------------------------------

    def _drain_outcomes(self) -> None:
        with self._outcomes_lock:
            outcomes = list(self._outcomes)
            self._outcomes.clear()
            self._drain_scheduled = False
        if not outcomes:
            return
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        current = self._generation
        last_plain_ack = 0
        for outcome in outcomes:
            delivery = outcome.delivery
            if delivery.generation != current:
                continue  # stale delivery tag from a previous channel
            if outcome.action == "ack":
                last_plain_ack = delivery.delivery_tag
                continue
            if last_plain_ack:
                channel.basic_ack(delivery_tag=last_plain_ack, multiple=True)
                last_plain_ack = 0
            self._move(channel, outcome)
        if last_plain_ack:
            channel.basic_ack(delivery_tag=last_plain_ack, multiple=True)

    def _move(self, channel: BlockingChannel, outcome: _Outcome) -> None:
        """Publish a retry or dead letter with confirm, then ack the original."""
        delivery = outcome.delivery
        name = delivery.registration.name
        headers = _headers.without_death_headers(delivery.properties.headers)
        headers.update(outcome.headers)
        registration = delivery.registration
        if outcome.action == "retry":
            exchange, routing_key = _topology.declare_delay(
                channel, registration, outcome.delay_ms, self.exchange_type
            )
        else:
            exchange, routing_key = _topology.dead_letter_route(registration)
        properties = _headers.copy_properties(delivery.properties, headers)
        try:
            try:
                channel.basic_publish(
                    exchange=exchange,
                    routing_key=routing_key or delivery.routing_key,
                    body=delivery.body,
                    properties=properties,
                    mandatory=True,
                )
            except pika.exceptions.UnroutableError:
                if outcome.action != "dead_letter":
                    raise
                # The routing key matches no binding of the dead-letter
                # queue: put it there directly rather than lose it.
                channel.basic_publish(
                    exchange="",
                    routing_key=_names.dead_letter_queue(name),
                    body=delivery.body,
                    properties=properties,
                    mandatory=True,
                )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.error(
                "Could not move an event of %s to its %s destination (%s); "
                "returning it to the queue",
                name,
                outcome.action,
                type(exc).__name__,
            )
            channel.basic_nack(delivery_tag=delivery.delivery_tag, requeue=True)
            return
        channel.basic_ack(delivery_tag=delivery.delivery_tag)

    # -- helpers for callers ----------------------------------------------------------


def _noop() -> None:
    """Wakes the I/O loop."""


def _raise_if_closed(channel: BlockingChannel | None) -> None:
    """Raise why ``channel`` was closed, if it was.

    pika's ``connection.process_data_events()`` does not raise when the broker
    closes a channel (e.g. a consumer timeout) but leaves its connection open;
    without this the loss would go unnoticed until the next channel operation.
    """
    if channel is None or channel.is_open:
        return
    reason = getattr(channel, "_closing_reason", None)  # set by pika; absent: closed anyway
    if isinstance(reason, pika.exceptions.AMQPChannelError):
        raise reason
    raise pika.exceptions.ChannelWrongStateError("the channel was closed")


def _hint(exc: BaseException) -> str:
    """Advice for the one loss whose cause a handler controls."""
    if (
        isinstance(exc, pika.exceptions.ChannelClosedByBroker)
        and exc.reply_code == 406
        and "timed out" in exc.reply_text
    ):
        return (
            ". A handler ran longer than the broker's consumer_timeout; its event will be "
            "redelivered. Raise consumer_timeout in rabbitmq.conf or make the handler faster"
        )
    return ""
