"""A batch channel: many events sent back to back, their confirms taken as they come.

pika's blocking channel waits for each confirm inside ``basic_publish``.
:class:`BatchChannel` publishes through a :class:`~.._amqp.pika_internals.Pipeline`
instead and tracks the broker's acks, nacks and returns itself, so that a
batch waits for the broker once. Used by :meth:`Publisher.publish_many
<domain_event_broker.Publisher.publish_many>` and the outbox relay.

Without pika's fast paths (no pipeline), it publishes one event at a time
on pika's blocking channel, each waiting for its confirm: the same results,
slower; the deadline is then checked between events, and the wait for one
confirm is bounded by the heartbeat, as for a single publish.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

import pika
import pika.exceptions

from .._amqp.pika_internals import Pipeline, pipeline
from ..errors import DomainEventBrokerError, PublishError, UnroutableError
from ..events import DomainEvent

__all__ = ["MAX_IN_FLIGHT", "SEND_EVERY", "BatchChannel", "NoConfirmInTime"]

#: Most events of a batch waiting for their confirm at once; past it,
#: publishing pauses until half of them are confirmed (keeps the client's
#: buffers and the broker's flow control in bounds).
MAX_IN_FLIGHT: Final = 1000
#: Events of a batch written into the client's buffer before it is sent.
SEND_EVERY: Final = 50

#: index in the batch -> ``None`` (confirmed) or why it failed
Results = dict[int, "DomainEventBrokerError | None"]


class NoConfirmInTime(Exception):
    """The deadline passed while waiting for a batch's confirms."""


def _nothing() -> None:
    """A timer callback that only wakes pika's I/O loop up."""


def _refused(event: DomainEvent) -> PublishError:
    return PublishError(
        f"publishing {event.routing_key!r} (uuid {event.uuid_string}): "
        f"the broker refused (nacked) the message"
    )


def _unroutable(event: DomainEvent) -> UnroutableError:
    return UnroutableError(
        f"publishing {event.routing_key!r} (uuid {event.uuid_string}): "
        f"the message could not be routed (no queue is bound)"
    )


class _Confirms:
    """Confirms of one batch channel, whose delivery tags count from 1.

    A returned message is matched to its publish by the publish sequence
    (the delivery tag), not by its ``message_id`` alone, which two events of a
    batch may share: the broker returns unroutable messages in the order they
    were published, each before its confirm. So a return belongs to the first
    publish after the last returned one that is not confirmed yet and carries
    the returned routing key, message id and body. (An earlier publish of the
    same key and id may still wait for its confirm, e.g. for a disk write,
    while a later one is returned: the body tells them apart. Publishes equal
    in all three are the same event to the caller.)

    Called by pika's I/O loop in the publishing thread, never concurrently.
    """

    def __init__(self) -> None:
        self._next_tag = 1
        #: delivery tag -> index in the current batch, of unconfirmed events
        self._waiting: dict[int, int] = {}
        self._order: deque[int] = deque()
        #: delivery tags of the publishes the broker returned as unroutable
        self._returned: set[int] = set()
        #: the delivery tag of the last publish returned
        self._last_returned = 0
        self._batch: Sequence[DomainEvent] = ()
        self._bodies: Sequence[bytes] = ()
        self._results: Results = {}

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def start(
        self, batch: Sequence[DomainEvent], bodies: Sequence[bytes], results: Results
    ) -> None:
        self._batch, self._bodies, self._results = batch, bodies, results
        self._waiting.clear()
        self._order.clear()
        self._returned.clear()

    def sent(self, index: int) -> None:
        self._waiting[self._next_tag] = index
        self._order.append(self._next_tag)
        self._next_tag += 1

    def on_return(self, routing_key: str, properties: pika.BasicProperties, body: bytes) -> None:
        message_id = properties.message_id
        for tag in self._order:  # ascending; confirmed tags may linger: skipped
            if tag <= self._last_returned or tag not in self._waiting:
                continue
            index = self._waiting[tag]
            event = self._batch[index]
            if (
                event.routing_key == routing_key
                and event.uuid_string == message_id
                and self._bodies[index] == body
            ):
                self._returned.add(tag)
                self._last_returned = tag
                return

    def on_confirm(self, tag: int, multiple: bool, refused: bool) -> None:
        if multiple:
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
            self._results[index] = _refused(event)
        elif tag in self._returned:
            self._returned.discard(tag)
            self._results[index] = _unroutable(event)
        else:
            self._results[index] = None


class BatchChannel:
    """A second channel of a connection, in confirm mode, for batches.

    Args:
        connection: the open connection to open it on.
        generation: the connection's :attr:`Link.generation
            <domain_event_broker._amqp.link.Link.generation>`; the channel is
            only :meth:`usable` on that one.
    """

    def __init__(self, connection: pika.BlockingConnection, generation: int) -> None:
        self.generation = generation
        self._channel = connection.channel()
        self._confirms = _Confirms()
        self._pipeline = pipeline(
            self._channel, self._confirms.on_confirm, self._confirms.on_return
        )
        if self._pipeline is None:  # pika's own paths: one confirm at a time
            self._channel.confirm_delivery()

    def usable(self, generation: int) -> bool:
        """Whether it is open, on the connection of ``generation``."""
        return self.generation == generation and self._channel.is_open

    def send(
        self,
        exchange: str,
        todo: Sequence[int],
        batch: Sequence[DomainEvent],
        bodies: Sequence[bytes],
        properties: Sequence[pika.BasicProperties],
        results: Results,
        *,
        deadline: float,
        mandatory: bool,
        written: set[int],
    ) -> None:
        """Send the events at indexes ``todo``; wait for their confirms.

        Writes the outcome of each confirmed or refused event into ``results``,
        and adds the index of each event sent (whatever came of it) to ``written``.

        Raises:
            NoConfirmInTime: ``deadline`` passed first.
            CONNECTION_ERRORS: the connection or channel was lost.
        """
        line = self._pipeline
        if line is None:
            self._send_one_by_one(
                exchange, todo, batch, bodies, properties, results, deadline, mandatory, written
            )
            return
        confirms = self._confirms
        confirms.start(batch, bodies, results)
        send = line.send_without_waiting
        low_water = MAX_IN_FLIGHT // 2
        for count, index in enumerate(todo, 1):
            if confirms.in_flight >= MAX_IN_FLIGHT:
                self._wait(line, lambda: confirms.in_flight <= low_water, deadline)
            elif count % SEND_EVERY == 0:
                line.run_until()  # send what is buffered; take confirms in
            written.add(index)
            send(exchange, batch[index].routing_key, bodies[index], properties[index], mandatory)
            confirms.sent(index)
        self._wait(line, lambda: confirms.in_flight == 0, deadline)

    def _send_one_by_one(
        self,
        exchange: str,
        todo: Sequence[int],
        batch: Sequence[DomainEvent],
        bodies: Sequence[bytes],
        properties: Sequence[pika.BasicProperties],
        results: Results,
        deadline: float,
        mandatory: bool,
        written: set[int],
    ) -> None:
        """:meth:`send` on pika's own paths: each event waits for its confirm."""
        for index in todo:
            if time.monotonic() >= deadline:
                raise NoConfirmInTime
            event = batch[index]
            written.add(index)
            try:
                self._channel.basic_publish(
                    exchange=exchange,
                    routing_key=event.routing_key,
                    body=bodies[index],
                    properties=properties[index],
                    mandatory=mandatory,
                )
            except pika.exceptions.UnroutableError:
                results[index] = _unroutable(event)
            except pika.exceptions.NackError:
                results[index] = _refused(event)
            else:
                results[index] = None

    def _wait(self, line: Pipeline, done: Callable[[], bool], deadline: float) -> None:
        """Process I/O until ``done()``, at most until ``deadline``."""
        if done():
            return
        connection = self._channel.connection
        time_left = deadline - time.monotonic()
        if time_left <= 0:
            raise NoConfirmInTime
        timer = connection.call_later(time_left, _nothing)  # wakes the I/O loop up
        try:
            line.run_until(lambda: done() or time.monotonic() >= deadline)
        finally:
            if connection.is_open:
                connection.remove_timeout(timer)
        if not done():
            raise NoConfirmInTime
