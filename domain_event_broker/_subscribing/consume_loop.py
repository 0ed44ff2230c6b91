"""The consuming loop: one run of ``Subscriber.start_consuming()``.

The thread that runs :meth:`ConsumeLoop.run` is the I/O thread; it alone
touches the channel. Deliveries go to handler threads; their outcomes come
back through a mailbox and are settled here. A lost connection is reopened
with backoff and consuming resumes; a dead handler thread ends the run with
an error at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp.connect import CONNECTION_ERRORS
from .._amqp.failures import is_consumer_timeout, translate_pika_error
from .._amqp.link import Link, Recovery
from .._amqp.pika_internals import deliver_as_read
from .._amqp.probes import queue_exists
from ..errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigurationError,
    HandlerThreadError,
    SubscriberStoppingError,
    TLSError,
)
from . import topology as _topology
from .dispatch import Action, Delivery, Outcome
from .handler_threads import Barrier, HandlerThreads, Intake, Mailbox, ThreadDied
from .registration import Registration
from .settle import Settler

__all__ = ["ConsumeLoop", "PendingRegistration"]

#: Log lines about consuming carry the Subscriber's module name.
log = logging.getLogger("domain_event_broker.subscribe")

#: Longest time (seconds) the I/O loop waits for network events before it
#: looks at stop requests, deadlines and signals again.
POLL_INTERVAL: Final = 0.2

#: Longest time (seconds) the I/O thread waits, after handing deliveries
#: over, for their outcomes, so that quick handlers' acknowledgements go out
#: in the same turn (a slow handler's go out when it is done).
CATCH_UP: Final = 0.002

#: Name of the thread that runs handlers of concurrency 1.
WORKER_THREAD_NAME: Final = "domain-event-broker-worker"


class PendingRegistration:
    """A handler registered while consuming, waiting for the I/O thread."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.abandoned = False
        self.lock = threading.Lock()


class ConsumeLoop:
    """Consumes for the handlers of one Subscriber until stopped.

    Args:
        link: the Subscriber's connection link.
        registrations: the Subscriber's handlers (appended to while running).
        declared: names whose topology is declared on the link's current
            channel (shared with the Subscriber's ``register()``).
        exchange: the events exchange.
        exchange_type: its type.
        prefetch_count: unacknowledged events per consumer.
        tick_callbacks: called after every poll while connected (at least
            every POLL_INTERVAL) with how long the longest-running handler
            call has run so far (0 when idle).
    """

    def __init__(
        self,
        link: Link,
        registrations: list[Registration],
        declared: set[str],
        exchange: str,
        exchange_type: str,
        prefetch_count: int,
        tick_callbacks: Sequence[Callable[[float], object]] = (),
    ) -> None:
        self._link = link
        self._tick_callbacks = tuple(tick_callbacks)
        self._registrations = registrations
        self._declared = declared
        self._exchange = exchange
        self._exchange_type = exchange_type
        self._prefetch_count = prefetch_count
        self.stop_requested = False
        #: What start_consuming() re-raises (SystemExit from a handler).
        self.stop_error: BaseException | None = None
        self.forced = False
        self._wakeup = threading.Event()
        self._mailbox = Mailbox(link.wake)
        self._settler = Settler(exchange_type)
        self._pools: dict[str, HandlerThreads] = {}
        self._shared_pool: HandlerThreads | None = None
        self._in_flight = 0
        self._intake = Intake(self._mailbox)
        self._consumer_tags: dict[str, Registration] = {}
        self._cancelled: list[str] = []
        self._consuming_generation = -1
        #: The generation (channel) whose deliveries may still be started:
        #: -1 from the moment the I/O thread learns the channel is gone,
        #: so that handler threads skip what it had delivered (see _skip).
        self._live_generation = -1
        self._pending: list[PendingRegistration] = []
        self._pending_lock = threading.Lock()
        #: Barriers taken from the mailbox, released once what was posted
        #: before them is settled (or their channel is known gone).
        self._barriers: list[Barrier] = []
        self.io_thread: threading.Thread | None = None

    @property
    def consuming(self) -> bool:
        """Whether consumers are set up on the current channel."""
        return self._link.is_open and self._consuming_generation == self._link.generation

    # -- requests from any thread ------------------------------------------------------

    def request_stop(self) -> None:
        """Stop gracefully (any thread, a handler or a signal handler)."""
        self.stop_requested = True
        self._wakeup.set()
        if threading.current_thread() is not self.io_thread:
            self._link.wake()

    def add(self, registration: Registration, timeout: float) -> None:
        """Declare and consume a handler registered while running (any thread).

        Raises:
            SubscriberStoppingError: a stop was requested (before or while
                waiting): the run would never consume it.
            ConfigurationError: the broker refused its queue's arguments.
            BrokerError: it could not be declared in ``timeout`` seconds.
        """
        pending = PendingRegistration(registration)
        if threading.current_thread() is self.io_thread:
            self._raise_if_stopping(registration)
            self._start_pending(pending)
        else:
            with self._pending_lock:
                # Checked under the lock: once stopping, the I/O thread fails
                # what is pending (see _fail_pending) and takes no more.
                self._raise_if_stopping(registration)
                self._pending.append(pending)
            self._link.wake()
            if not pending.done.wait(timeout):
                with pending.lock:
                    pending.abandoned = True
                    if not pending.done.is_set():
                        raise BrokerUnavailableError(
                            f"could not declare the queues of {registration.name!r} "
                            f"within {timeout:g}s (the connection is down)"
                        )
        if pending.error is not None:
            raise pending.error

    def _raise_if_stopping(self, registration: Registration) -> None:
        if self.stop_requested:
            raise SubscriberStoppingError(_stopping_message(registration))

    # -- the loop (I/O thread) ---------------------------------------------------------

    def run(self, deadline: float | None) -> None:
        """Consume until stopped or ``deadline`` (monotonic seconds) passes.

        Raises:
            AuthenticationError, ConfigurationError: not retried.
            HandlerThreadError: a handler thread died.
        """
        self.io_thread = threading.current_thread()
        recovery = Recovery(
            log, self._link.config.display, "consuming again", component="subscriber"
        )
        try:
            while not self.stop_requested:
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop_requested = True
                    break
                try:
                    self._ensure_consuming()
                    recovery.on_connected()
                    self._poll(deadline)
                except (ConfigurationError, HandlerThreadError, TLSError):
                    raise
                except (AuthenticationError, BrokerUnavailableError, *CONNECTION_ERRORS) as exc:
                    if isinstance(exc, AuthenticationError):
                        self._raise_unless_rotating(exc, recovery)
                    pause = recovery.on_lost(exc, _hint(exc))
                    self._on_connection_lost()
                    if deadline is not None:
                        pause = max(0.0, min(pause, deadline - time.monotonic()))
                    self._wakeup.wait(pause)
            self._shutdown()
        finally:
            self._live_generation = -1
            self._release_barriers()
            self._stop_pools()
            self._fail_pending()

    def _raise_unless_rotating(self, exc: AuthenticationError, recovery: Recovery) -> None:
        """Raise ``exc`` unless the credentials refused while reconnecting may
        be a secret being rotated: the settings come from the configured
        source (read again at each attempt: the broker may have the new
        password before the file has it), and the link was lost less than
        the connection timeout ago. Then it is retried like a lost link."""
        config = self._link.config
        if not (config.reread and recovery.lost and recovery.lost_for < config.timeout):
            raise exc
        log.warning(
            "%s; reading the broker settings again and retrying for up to %gs "
            "after the loss (a password being rotated?)",
            exc,
            config.timeout,
        )

    def _poll(self, deadline: float | None) -> None:
        connection = self._link.connection
        assert connection is not None
        limit = POLL_INTERVAL
        if deadline is not None:
            limit = max(0.0, min(limit, deadline - time.monotonic()))
        if self._process_data_events(connection, limit):
            # Rather than go back to the socket and take the GIL from the
            # handler thread, sleep until it is done (quick handlers) or a
            # moment has passed: one switch each way per batch.
            self._mailbox.wait_for_outcomes(CATCH_UP)
        self._drain()
        self._check_pools()
        _raise_if_closed(self._link)
        self._tick()

    def _tick(self) -> None:
        """Tell the tick callbacks the loop is alive and connected."""
        if not self._tick_callbacks:
            return
        busy_for = max((pool.busy_for() for pool in self._all_pools()), default=0.0)
        for callback in self._tick_callbacks:
            try:
                callback(busy_for)
            except Exception:  # a health probe must not stop the worker
                log.warning("A tick callback failed", exc_info=True)

    def _ensure_consuming(self) -> None:
        if self._link.is_open and self._consuming_generation == self._link.generation:
            if self._cancelled:
                self._resume_cancelled()
            if self.consuming:  # else it dropped the connection: consume on a new one
                self._take_pending()
                return
        if not self._link.is_open:
            self._on_connection_lost()
        channel = self._link.channel()
        self._settler.new_channel(self._link.generation)
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        self._consumer_tags.clear()
        self._cancelled.clear()
        for registration in list(self._registrations):
            if registration.name not in self._declared:  # register() did it already
                self._declare(channel, registration)
            self._consume(channel, registration)
        self._consuming_generation = self._link.generation
        self._live_generation = self._link.generation
        self._take_pending()

    def _declare(self, channel: BlockingChannel, registration: Registration) -> None:
        _topology.declare_handler(channel, registration, self._exchange, self._exchange_type)
        self._declared.add(registration.name)

    def _consume(self, channel: BlockingChannel, registration: Registration) -> None:
        pool = self._pool_for(registration)
        generation = self._link.generation
        settler = self._settler
        intake = self._intake

        def on_message(
            _channel: BlockingChannel,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            settler.delivered(method.delivery_tag)
            intake.add(
                pool,
                Delivery(
                    registration=registration,
                    delivery_tag=method.delivery_tag,
                    routing_key=method.routing_key,
                    body=body,
                    properties=properties,
                    redelivered=bool(method.redelivered),
                    generation=generation,
                ),
            )

        channel.basic_qos(prefetch_count=max(self._prefetch_count, registration.concurrency))
        tag = channel.basic_consume(queue=registration.name, on_message_callback=on_message)
        deliver_as_read(channel, tag)
        self._consumer_tags[tag] = registration

    def _process_data_events(self, connection: pika.BlockingConnection, limit: float) -> int:
        """One turn of pika's loop; what it delivered goes to the handlers.

        Deliveries are handed over once per turn, not one by one: a handler
        thread is woken once for all a read brought, and the two threads
        do not take the GIL from each other for every event.

        Returns:
            How many deliveries were handed over.
        """
        try:
            connection.process_data_events(time_limit=limit)
        finally:  # even if the connection was lost midway: none is left behind
            if not self._link.is_open:
                # Known dead from now on: handler threads start nothing more
                # of what its channel delivered (the broker redelivers it).
                self._live_generation = -1
            handed = self._hand_over()
        return handed

    def _hand_over(self) -> int:
        handed = self._intake.hand_over()
        self._in_flight += handed
        return handed

    def _pool_for(self, registration: Registration) -> HandlerThreads:
        if registration.concurrency == 1:
            if self._shared_pool is None:
                self._shared_pool = self._new_pool(WORKER_THREAD_NAME, 1)
            return self._shared_pool
        pool = self._pools.get(registration.name)
        if pool is None:
            pool = self._new_pool(
                f"{WORKER_THREAD_NAME}-{registration.name}", registration.concurrency
            )
            self._pools[registration.name] = pool
        return pool

    def _new_pool(self, name: str, count: int) -> HandlerThreads:
        pool = HandlerThreads(name, count, self._mailbox, self._skip)
        pool.start()
        return pool

    def _skip(self, delivery: Delivery) -> bool:
        """Asked by a handler thread right before it starts each delivery:
        is it no longer to be handled (stopping, or its channel is known to
        be gone: its acknowledgement could not be sent, and the broker
        redelivers it)?"""
        return self.stop_requested or delivery.generation != self._live_generation

    def _drain(self) -> None:
        outcomes = self._take_outcomes()
        if outcomes and self._link.is_open:
            channel = self._link.channel()
            if self._consumer_tags and any(o.action is Action.STOP for o in outcomes):
                # A handler stopped the worker: its event goes back with a
                # counted reject. Cancel first, or the broker hands it straight
                # back to this channel, where (stopping) it would be given back
                # as a fresh copy, its count reset: a loop the delivery limit
                # never ends (RabbitMQ 4.3).
                self._cancel_consumers(channel)
            self._settler.settle(channel, outcomes)
        if self._barriers and self._link.is_open:
            # What arrived while giving back goes to its thread before the
            # suspect starts: that thread gives it back too, if returned.
            connection = self._link.connection
            assert connection is not None
            self._process_data_events(connection, 0)
            if self._link.is_open:
                self._release_barriers()

    def _release_barriers(self) -> None:
        barriers, self._barriers = self._barriers, []
        for barrier in barriers:
            barrier.done.set()

    def _cancel_consumers(self, channel: BlockingChannel) -> None:
        """Cancel every consumer of the channel; what it delivered stays ours."""
        connection = self._link.connection
        assert connection is not None
        # On pika's own paths (fast paths off) deliveries pika received
        # wait in its buffer until dispatched, and basic_cancel would
        # reject them (counted toward a quorum queue's delivery limit):
        # take them in first, to be given back as the others are.
        self._process_data_events(connection, 0)
        for tag in list(self._consumer_tags):
            channel.basic_cancel(tag)
        self._consumer_tags.clear()

    def _take_outcomes(self) -> list[Outcome]:
        """What handler threads reported; raises if one of them died."""
        outcomes: list[Outcome] = []
        for item in self._mailbox.take():
            if isinstance(item, Barrier):
                self._barriers.append(item)
                continue
            if isinstance(item, ThreadDied):
                raise HandlerThreadError(
                    f"the handler thread {item.thread_name} died: {item.error!r}; "
                    f"unacknowledged events will be redelivered"
                ) from item.error
            self._in_flight -= 1
            if item.action is Action.STOP and self.stop_error is None:
                self.stop_error = item.error
                self.request_stop()
            outcomes.append(item)
        return outcomes

    def _check_pools(self) -> None:
        for pool in self._all_pools():
            if not pool.alive():
                self._drain()  # raises the death it posted, if it could
                raise HandlerThreadError("a handler thread stopped without a word")

    def _all_pools(self) -> list[HandlerThreads]:
        pools = list(self._pools.values())
        if self._shared_pool is not None:
            pools.append(self._shared_pool)
        return pools

    def _on_cancelled_by_broker(self, method_frame: Any) -> None:
        self._cancelled.append(method_frame.method.consumer_tag)

    def _resume_cancelled(self) -> None:
        """Consume again from the queues whose consumer the broker cancelled.

        A deleted queue is declared and consumed again on this channel. A
        queue that still exists had its consumer cancelled for another
        reason: on RabbitMQ 4.3 and later a quorum queue does so when a
        delivery stayed unacknowledged past the broker's ``consumer_timeout``
        (it puts the delivery back and ignores the late acknowledgement;
        earlier versions close the channel instead, see :func:`_hint`), and a
        cluster may do so when a queue's node goes. Then the connection is
        dropped and consuming starts on a new one: a consumer cancelled for
        a timeout lingers on its channel (RabbitMQ 4.3.6 wakes it up again
        when the late acknowledgement comes, and sends it deliveries pika
        no longer expects), and whatever the old channel held is redelivered,
        as after a channel the broker closed.
        """
        channel = self._link.channel()
        connection = self._link.connection
        assert connection is not None
        reopen = False
        while self._cancelled:
            registration = self._consumer_tags.pop(self._cancelled.pop(), None)
            if registration is None:
                continue  # not one of ours (any more)
            if queue_exists(connection, registration.name):
                log.warning(
                    "The broker cancelled the consumer of handler %s although its queue "
                    "still exists: on RabbitMQ 4.3 and later a quorum queue does so when "
                    "an event stayed unacknowledged longer than the broker's "
                    "consumer_timeout (the handler ran too long; the event is delivered "
                    "again; raise consumer_timeout or make the handler faster), or the "
                    "queue moved in a cluster. Consuming again on a new connection "
                    "(events in flight are redelivered)",
                    registration.name,
                )
                reopen = True
                continue
            log.warning(
                "The broker cancelled the consumer of handler %s: its queue was deleted; "
                "declaring it again",
                registration.name,
            )
            self._declare(channel, registration)
            self._consume(channel, registration)
        if reopen:
            self._on_connection_lost()

    def _on_connection_lost(self) -> None:
        """Forget the channel; outcomes for its tags are dropped as stale."""
        self._live_generation = -1
        self._link.drop()
        self._declared.clear()
        self._consumer_tags.clear()
        self._cancelled.clear()
        self._consuming_generation = -1
        # Settle nothing of the old channel; keep counting what is in flight.
        self._take_outcomes()
        self._release_barriers()

    def _shutdown(self) -> None:
        """Graceful stop: no new deliveries, finish the running handlers."""
        # A handler waiting in register() is one of those running handlers:
        # it gets its error now, not after its timeout.
        self._fail_pending()
        if not self._link.is_open:
            return
        try:
            self._cancel_consumers(self._link.channel())
            # What arrived while cancelling: skipped (stopping) and given back.
            connection = self._link.connection
            assert connection is not None
            self._hand_over()
            while self._in_flight > 0:
                self._process_data_events(connection, POLL_INTERVAL)
                self._drain()
                self._check_pools()
                _raise_if_closed(self._link)
        except CONNECTION_ERRORS as exc:
            log.warning(
                "Lost the connection while stopping (%s); unacknowledged events "
                "will be redelivered",
                exc,
            )

    def _stop_pools(self) -> None:
        for pool in self._all_pools():
            # After a forced stop a handler may hang: do not wait for it.
            pool.stop(timeout=1.0 if self.forced else None)

    # -- handlers registered while consuming ----------------------------------------

    def _take_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for item in pending:
            self._start_pending(item)

    def _start_pending(self, pending: PendingRegistration) -> None:
        with pending.lock:
            if pending.abandoned:
                return
            try:
                channel = self._link.channel()
                self._declare(channel, pending.registration)
                self._consume(channel, pending.registration)
                self._registrations.append(pending.registration)
            except ConfigurationError as exc:
                pending.error = exc
            except CONNECTION_ERRORS as exc:
                name = pending.registration.name
                pending.error = translate_pika_error(exc, f"declaring the queues of {name!r}")
                pending.done.set()
                raise
            pending.done.set()

    def _fail_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for item in pending:
            with item.lock:
                if self.stop_requested:
                    item.error = SubscriberStoppingError(_stopping_message(item.registration))
                else:
                    item.error = BrokerUnavailableError(
                        f"the subscriber stopped before {item.registration.name!r} was declared"
                    )
                item.done.set()


def _stopping_message(registration: Registration) -> str:
    return (
        f"cannot register {registration.name!r}: the subscriber is stopping "
        f"(stop_consuming() was called, a stop signal arrived or the timeout of "
        f"start_consuming() passed); nothing was declared for it"
    )


def _raise_if_closed(link: Link) -> None:
    """Raise why the channel was closed, if it was.

    pika's ``process_data_events()`` does not raise when the broker closes a
    channel (e.g. a consumer timeout) but leaves its connection open;
    without this the loss would go unnoticed until the next channel operation.
    """
    if link.is_open or link.connection is None:
        return
    reason = link.closing_reason()
    if isinstance(reason, pika.exceptions.AMQPChannelError):
        raise reason
    raise pika.exceptions.ChannelWrongStateError("the channel was closed")


def _hint(exc: BaseException) -> str:
    """Advice for the one loss whose cause a handler controls."""
    if is_consumer_timeout(exc):
        return (
            ". A handler ran longer than the broker's consumer_timeout; its event will be "
            "redelivered. Raise consumer_timeout in rabbitmq.conf or make the handler faster"
        )
    return ""
