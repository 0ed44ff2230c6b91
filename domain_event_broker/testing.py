"""Helpers for testing code that publishes and handles domain events.

:func:`capture_events` records what is published; :class:`StubBroker` runs a
real Subscriber's handlers on it, in memory. Both need no broker. The pytest
plugin (loaded automatically) offers them as the ``captured_events`` and
``stub_broker`` fixtures.

.. versionadded:: 4.0
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pika

from ._amqp.names import DEFAULT_EXCHANGE
from ._core import headers as _headers
from ._core.topic import topic_matches
from ._publishing import publisher as publish
from ._subscribing import subscriber as subscribe
from ._subscribing.dispatch import Action, Delivery, dispatch
from ._subscribing.registration import Registration
from .errors import MalformedEventError, UnroutableError
from .events import DomainEvent

__all__ = ["Handled", "StubBroker", "capture_events"]


@contextmanager
def capture_events() -> Iterator[list[DomainEvent]]:
    """Record the events published inside the block instead of sending them.

    Every event published in this process while the block runs, from any
    thread, through :func:`~domain_event_broker.publish_domain_event` or
    :meth:`Publisher.publish_event <domain_event_broker.Publisher.publish_event>`
    (and so Django's ``publish_on_commit`` once the transaction commits), is
    appended to the list and not sent: no broker is needed. Invalid events
    are still refused as usual (``ValueError``, ``TypeError``). Blocks may
    nest; each records every event. Raw ``Publisher.publish()`` messages are
    sent as usual.

    Yields:
        The list the events are appended to, in publishing order.

    Example::

        with capture_events() as events:
            register_user("ada@example.com")
        assert [e.routing_key for e in events] == ["user.registered"]

    .. versionadded:: 4.0
    """
    events: list[DomainEvent] = []
    with publish._captures_lock:
        publish._captures.append(events)
    try:
        yield events
    finally:
        with publish._captures_lock:
            for index, active in enumerate(publish._captures):
                if active is events:
                    del publish._captures[index]
                    break


@dataclass(frozen=True)
class Handled:
    """One delivery run by :class:`StubBroker`, and how it ended."""

    #: The handler's registered name.
    handler: str
    #: The event as the handler received it (``retries`` set); ``None`` for
    #: a body that is not a domain event.
    event: DomainEvent | None
    #: ``"handled"``, ``"retried"``, ``"dead_lettered"`` or ``"discarded"``.
    outcome: str
    #: For ``"retried"``: the delay the handler asked for (not waited for).
    delay: float | None = None
    #: For ``"dead_lettered"`` and ``"discarded"``: ``x-exception-type``.
    exception_type: str | None = None
    #: For ``"dead_lettered"`` and ``"discarded"``: ``x-exception-message``.
    exception_message: str | None = None


class StubBroker:
    """Runs a real :class:`~domain_event_broker.Subscriber`'s handlers in memory.

    Inside ``with StubBroker() as broker:``, no broker is needed:

    * ``Subscriber.register()`` records the handler instead of declaring
      queues; each handler name has one queue, shared by the Subscribers
      that register that name (as on a broker);
    * events published in this process (``publish_domain_event``,
      ``Publisher.publish_event``, ``Publisher.publish_many``,
      ``publish_on_commit``) are routed to every handler whose binding keys
      match, as a topic exchange does (``*`` one word, ``#`` zero or more);
      with ``require_route=True``, an event no handler is bound for raises
      :class:`~domain_event_broker.UnroutableError`, as on a broker;
    * ``Subscriber.start_consuming()`` delivers the events waiting for that
      Subscriber's handlers until none is left, it is stopped
      (``stop_consuming()``, from a handler too) or its ``timeout`` passed;
      :meth:`run` delivers the events of every handler. What happens to each
      event (handled, retried, dead-lettered, discarded) is decided by the
      same code the real worker runs; ``max_retries`` and ``event.retries``
      behave as on a broker, but retry delays are not waited for.

    Example::

        with StubBroker() as broker:
            subscriber = Subscriber()
            subscriber.register(send_welcome, "welcome", ["user.registered"],
                                dead_letter=True)
            publish_domain_event("user.registered", {"email": "ada@example.com"})
            broker.run()
        assert [h.outcome for h in broker.history] == ["handled"]

    Args:
        max_deliveries: :meth:`run` raises ``RuntimeError`` after this many
            deliveries (a handler that retries or publishes forever).

    .. versionadded:: 4.1
    .. versionchanged:: 4.2
       ``start_consuming()`` runs its own Subscriber's handlers only, stops
       at ``stop_consuming()`` and at its ``timeout``; ``require_route``
       raises :class:`~domain_event_broker.UnroutableError`; several
       Subscribers may register one name; :meth:`queued`.
    """

    def __init__(self, *, max_deliveries: int = 10_000) -> None:
        self.max_deliveries = max_deliveries
        #: Every event published while active, in order (not those refused
        #: as unroutable).
        self.published: list[DomainEvent] = []
        #: Every delivery run, in order.
        self.history: list[Handled] = []
        #: Per handler name: its queue, its dead letters, its bindings
        #: (exchange, binding key), and the registrations consuming it (one
        #: per Subscriber).
        self._queues: dict[str, deque[_StubMessage]] = {}
        self._dead: dict[str, list[_StubMessage]] = {}
        self._bindings: dict[str, set[tuple[str, str]]] = {}
        self._consumers: dict[str, list[tuple[_StubConsumer, Registration]]] = {}
        #: Per handler name: how many deliveries went out (consumers take turns).
        self._turns: dict[str, int] = {}
        self._tag = 0
        self._lock = threading.RLock()
        self._router = _Router(self)
        self._active = False

    # -- activation -----------------------------------------------------------------

    def __enter__(self) -> StubBroker:
        with publish._captures_lock:
            publish._captures.append(self._router)
        subscribe.registration_hooks.append(self._new_consumer)
        self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._active = False
        with publish._captures_lock:
            for index, active in enumerate(publish._captures):
                if active is self._router:
                    del publish._captures[index]
                    break
        if self._new_consumer in subscribe.registration_hooks:
            subscribe.registration_hooks.remove(self._new_consumer)

    def _new_consumer(self, exchange: str) -> _StubConsumer:
        """Registration hook: what stands in for the broker for one Subscriber."""
        return _StubConsumer(self, exchange)

    def _register(self, consumer: _StubConsumer, registration: Registration) -> None:
        with self._lock:
            name = registration.name
            self._consumers.setdefault(name, []).append((consumer, registration))
            self._bindings.setdefault(name, set()).update(
                (consumer.exchange, key) for key in registration.binding_keys
            )
            self._queues.setdefault(name, deque())
            self._dead.setdefault(name, [])

    # -- publishing -----------------------------------------------------------------

    def publish(
        self,
        event: DomainEvent,
        *,
        require_route: bool = False,
        exchange: str = DEFAULT_EXCHANGE,
    ) -> None:
        """Route ``event`` to the matching handlers' queues (what publishing does).

        Args:
            event: the event.
            require_route: refuse an event no handler is bound for.
            exchange: the exchange it is published to: it reaches the
                handlers of Subscribers on that exchange only.

        Raises:
            UnroutableError: ``require_route`` and no handler is bound for the
                event's routing key (nothing is queued or recorded).

        .. versionchanged:: 4.2
           ``require_route`` and ``exchange``.
        """
        with self._lock:
            names = [
                name
                for name, bindings in self._bindings.items()
                if any(
                    bound == exchange and topic_matches(key, event.routing_key)
                    for bound, key in bindings
                )
            ]
            if not names and require_route:
                raise UnroutableError(
                    f"publishing {event.routing_key!r} (uuid {event.uuid_string}): no handler "
                    "is bound for this routing key, so the (stub) broker returned the event "
                    "(is the subscriber's handler registered?)"
                )
            self.published.append(event)
            body = event.to_json().encode("utf-8")
            for name in names:
                self._queues[name].append(_StubMessage(event.routing_key, body, {}))

    # -- running handlers ---------------------------------------------------------------

    def run(self) -> int:
        """Deliver every waiting event, including those published or retried meanwhile.

        Runs the handlers of every Subscriber (``start_consuming()`` runs its
        own Subscriber's only). ``stop_consuming()`` does not end it.

        Returns:
            How many deliveries were run.

        Raises:
            RuntimeError: more than ``max_deliveries`` deliveries.
            SystemExit, KeyboardInterrupt: raised by a handler (the event stays
                in its queue), as ``start_consuming()`` raises them.
        """
        return self._run(None, None)

    def _run(self, consumer: _StubConsumer | None, deadline: float | None) -> int:
        """Deliver to ``consumer``'s handlers (``None``: all) until nothing is
        left, ``consumer`` is stopped or ``deadline`` (monotonic) passed."""
        count = 0
        while True:
            if consumer is not None and consumer.stopping:
                return count
            if deadline is not None and time.monotonic() >= deadline:
                return count
            with self._lock:
                picked = self._next(consumer)
                if picked is None:
                    return count
                registration, message = picked
                self._tag += 1
                tag = self._tag
            count += 1
            if count > self.max_deliveries:
                with self._lock:
                    self._queues[registration.name].appendleft(message)
                raise RuntimeError(
                    f"StubBroker.run() stopped after {self.max_deliveries} deliveries: "
                    "does a handler retry or publish forever?"
                )
            self._deliver(registration, message, tag)

    def _next(self, consumer: _StubConsumer | None) -> tuple[Registration, _StubMessage] | None:
        """The next delivery for ``consumer`` (``None``: anyone); under the lock."""
        for name, waiting in self._queues.items():
            if not waiting:
                continue
            registrations = [
                registration
                for owner, registration in self._consumers.get(name, [])
                if consumer is None or owner is consumer
            ]
            if not registrations:
                continue
            turn = self._turns.get(name, 0)
            self._turns[name] = turn + 1
            return registrations[turn % len(registrations)], waiting.popleft()
        return None

    def _deliver(self, registration: Registration, message: _StubMessage, tag: int) -> None:
        delivery = Delivery(
            registration=registration,
            delivery_tag=tag,
            routing_key=message.routing_key,
            body=message.body,
            properties=pika.BasicProperties(headers=dict(message.headers) or None),
        )
        outcome = dispatch(delivery)
        event = _event_of(message)
        name = registration.name
        if outcome.action is Action.STOP:
            with self._lock:
                self._queues[name].appendleft(message)
            assert outcome.error is not None
            raise outcome.error
        if outcome.action is Action.RETRY:
            headers = {**message.headers, **outcome.headers}
            with self._lock:
                self._queues[name].append(_StubMessage(message.routing_key, message.body, headers))
            self._record(name, event, "retried", delay=outcome.delay_ms / 1000)
        elif outcome.action is Action.DEAD_LETTER:
            headers = {**message.headers, **outcome.headers}
            with self._lock:
                self._dead[name].append(_StubMessage(message.routing_key, message.body, headers))
            self._record(
                name,
                event,
                "dead_lettered",
                exception_type=headers.get(_headers.EXCEPTION_TYPE),
                exception_message=headers.get(_headers.EXCEPTION_MESSAGE),
            )
        elif outcome.action is Action.DISCARD:
            self._record(
                name,
                event,
                "discarded",
                exception_type=outcome.headers.get(_headers.EXCEPTION_TYPE),
                exception_message=outcome.headers.get(_headers.EXCEPTION_MESSAGE),
            )
        else:
            self._record(name, event, "handled")

    def _record(self, name: str, event: DomainEvent | None, outcome: str, **extra: Any) -> None:
        with self._lock:
            self.history.append(Handled(name, event, outcome, **extra))

    # -- what happened --------------------------------------------------------------

    def handled(self, name: str) -> list[DomainEvent]:
        """Events handler ``name`` handled successfully, in order."""
        return [
            h.event
            for h in self.history
            if h.handler == name and h.outcome == "handled" and h.event is not None
        ]

    def queued(self, name: str) -> list[DomainEvent]:
        """Events waiting in handler ``name``'s queue (not delivered yet), in order.

        .. versionadded:: 4.2
        """
        with self._lock:
            events = [_event_of(m) for m in self._queues.get(name, [])]
        return [event for event in events if event is not None]

    def dead_letters(self, name: str) -> list[DomainEvent]:
        """Events waiting in ``name``'s dead-letter queue, in order."""
        with self._lock:
            events = [_event_of(m) for m in self._dead.get(name, [])]
        return [event for event in events if event is not None]

    def replay(self, name: str) -> int:
        """Put ``name``'s dead letters back into its queue, as ``replay_all`` does.

        Returns:
            How many were replayed. Call :meth:`run` to deliver them.
        """
        with self._lock:
            dead = self._dead.get(name, [])
            self._dead[name] = []
            for message in dead:
                headers = {
                    key: value
                    for key, value in message.headers.items()
                    if key != _headers.RETRY_COUNT
                }
                self._queues[name].append(_StubMessage(message.routing_key, message.body, headers))
            return len(dead)


@dataclass(frozen=True)
class _StubMessage:
    routing_key: str
    body: bytes
    headers: dict[str, Any]


class _Router:
    """Takes the place of a capture list: published events are routed."""

    def __init__(self, broker: StubBroker) -> None:
        self._broker = broker

    def route(self, event: DomainEvent, mandatory: bool, exchange: str) -> None:
        self._broker.publish(event, require_route=mandatory, exchange=exchange)


class _StubConsumer:
    """One Subscriber's consumer on a :class:`StubBroker`: what its
    ``start_consuming()`` and ``stop_consuming()`` do."""

    def __init__(self, broker: StubBroker, exchange: str) -> None:
        self._broker = broker
        #: The exchange the Subscriber's queues are bound to.
        self.exchange = exchange
        self.stopping = False

    def register(self, registration: Registration) -> None:
        self._broker._register(self, registration)

    def consume(self, deadline: float | None) -> None:
        self.stopping = False  # as on a broker: a stop asked before is forgotten
        self._broker._run(self, deadline)

    def stop(self) -> None:
        self.stopping = True


def _event_of(message: _StubMessage) -> DomainEvent | None:
    try:
        event = DomainEvent.from_json(message.body)
    except MalformedEventError:
        return None
    event.retries = _headers.retry_count(message.headers)
    return event
