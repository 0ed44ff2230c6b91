"""A batch channel: many events sent back to back, their confirms taken as they come.

pika's blocking channel waits for each confirm inside ``basic_publish``.
:class:`BatchChannel` publishes on the underlying (asynchronous) channel
instead and tracks the broker's acks, nacks and returns itself, so that a
batch waits for the broker once. Used by :meth:`Publisher.publish_many
<domain_event_broker.Publisher.publish_many>` and the outbox relay.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import pika
import pika.exceptions
import pika.frame
import pika.spec

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
        self._batch: Sequence[DomainEvent] = ()
        self._results: Results = {}

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def start(self, batch: Sequence[DomainEvent], results: Results) -> None:
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
        impl = self._channel._impl
        impl.add_on_return_callback(self._confirms.on_return)
        impl.confirm_delivery(
            ack_nack_callback=self._confirms.on_confirm, callback=self._confirms.on_select_ok
        )
        self._channel._flush_output(lambda: self._confirms.selected)

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
    ) -> None:
        """Send the events at indexes ``todo``; wait for their confirms.

        Writes the outcome of each confirmed or refused event into ``results``.

        Raises:
            NoConfirmInTime: ``deadline`` passed first.
            CONNECTION_ERRORS: the connection or channel was lost.
        """
        channel, confirms = self._channel, self._confirms
        confirms.start(batch, results)
        # The underlying pika.channel.Channel does not wait for the confirm.
        impl = channel._impl
        low_water = MAX_IN_FLIGHT // 2
        for count, index in enumerate(todo, 1):
            if confirms.in_flight >= MAX_IN_FLIGHT:
                self._wait(lambda: confirms.in_flight <= low_water, deadline)
            elif count % SEND_EVERY == 0:
                channel._flush_output()  # send what is buffered; take confirms in
            impl.basic_publish(
                exchange=exchange,
                routing_key=batch[index].routing_key,
                body=bodies[index],
                properties=properties[index],
                mandatory=mandatory,
            )
            confirms.sent(index)
        self._wait(lambda: confirms.in_flight == 0, deadline)

    def _wait(self, done: Callable[[], bool], deadline: float) -> None:
        """Process I/O until ``done()``, at most until ``deadline``."""
        if done():
            return
        connection = self._channel.connection
        time_left = deadline - time.monotonic()
        if time_left <= 0:
            raise NoConfirmInTime
        timer = connection.call_later(time_left, _nothing)  # wakes the I/O loop up
        try:
            self._channel._flush_output(lambda: done() or time.monotonic() >= deadline)
        finally:
            if connection.is_open:
                connection.remove_timeout(timer)
        if not done():
            raise NoConfirmInTime
