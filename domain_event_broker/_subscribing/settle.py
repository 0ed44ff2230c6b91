"""Carrying out outcomes on the channel (I/O thread only).

An acknowledgement is sent only after the handler returned, or after the
event's copy was confirmed into its retry or dead-letter destination. When a
copy cannot be placed, the delivery goes back to its queue with an ERROR
line; the worker goes on with the next one.

The quorum delivery limit. A quorum queue counts what it gets back towards
its ``x-delivery-limit`` (20 on RabbitMQ 4, and the library declares 20 on
3.x too), and past it dead-letters or drops the event. What counts differs by
version (measured on 3.10.8, 4.0.5 and 4.3.6): every return on 3.10 and 4.0
(``basic.nack``, ``basic.reject``, ``basic.recover``, a closed channel or
connection); on 4.3, ``basic.reject`` and closed channels and connections,
but not ``basic.nack`` nor ``basic.recover`` (they only raise
``x-acquired-count``). So:

* a delivery no handler started (the worker is stopping) is *given back*
  to a quorum queue as a confirmed copy through ``name-retry-durable``, then
  acknowledged: a new message, counted from zero, at the tail of the queue
  (a classic queue, which has no limit, gets it back in place with
  ``basic.nack``). A stop, however often, spends nothing of the limit;
* a delivery returned at least once is given back the same way, before a
  handler thread starts a *suspect* one beside it (see
  :mod:`.handler_threads`): a crash while the suspect runs charges only it;
* a delivery that was handled, or whose handler stopped the worker, and
  could not be settled goes back with ``basic.reject``, which counts on
  every version: a move that keeps failing ends at the delivery limit rather
  than looping forever (on 4.3 ``basic.nack`` would not count).
"""

from __future__ import annotations

import logging
from typing import Any

import pika
import pika.data
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import frames as _frames
from .._amqp import names as _names
from .._amqp import pika_internals as _pika_internals
from .._amqp.connect import CONNECTION_ERRORS
from .._core import headers as _headers
from . import dispatch as _dispatch
from . import topology as _topology
from .dispatch import Action, Delivery, Outcome

__all__ = ["Settler"]

log = logging.getLogger(__name__)


#: Headers a quorum queue sets on each delivery: a given-back copy is a new
#: message, counted from zero (the broker would overwrite them anyway).
_BROKER_COUNTS = frozenset({"x-delivery-count", "x-acquired-count"})


class DelayRefusedError(Exception):
    """The broker refused the delay queue a retry needs."""


class Settler:
    """Acknowledges, moves and requeues deliveries of one channel at a time.

    Args:
        exchange_type: the type of exchanges it declares (delay queues).
    """

    def __init__(self, exchange_type: str) -> None:
        self._exchange_type = exchange_type
        #: Delay queues the broker refused, with why: later retries with that
        #: delay are dead-lettered instead of closing the channel again.
        self._refused: dict[tuple[str, int], str] = {}
        #: Delivery tags received on the current channel and not settled yet.
        self._outstanding: set[int] = set()
        self._generation = -1

    def new_channel(self, generation: int) -> None:
        """Forget the tags of the previous channel."""
        self._generation = generation
        self._outstanding.clear()

    def delivered(self, delivery_tag: int) -> None:
        """Note a delivery on the current channel."""
        self._outstanding.add(delivery_tag)

    def settle(self, channel: BlockingChannel, outcomes: list[Outcome]) -> None:
        """Carry out ``outcomes`` in order; stale ones (old channel) are dropped.

        Raises:
            pika errors of a lost connection or channel: the caller
                reconnects; unsettled deliveries are redelivered.
        """
        acks: list[int] = []
        for outcome in outcomes:
            delivery = outcome.delivery
            if delivery.generation != self._generation:
                continue  # its tag belongs to a closed channel: redelivered
            if outcome.action in (Action.ACK, Action.DISCARD):
                acks.append(delivery.delivery_tag)
                continue
            self._ack(channel, acks)
            acks = []
            if outcome.action is Action.SKIP:
                self._give_back(channel, delivery)
            elif outcome.action is Action.STOP:
                self._requeue(channel, delivery.delivery_tag)
            else:
                self._move(channel, outcome)
        self._ack(channel, acks)

    def _ack(self, channel: BlockingChannel, tags: list[int]) -> None:
        if not tags:
            return
        self._outstanding.difference_update(tags)
        highest = max(tags)
        if not self._outstanding or min(self._outstanding) > highest:
            # Nothing older is pending: one frame acknowledges them all.
            channel.basic_ack(delivery_tag=highest, multiple=True)
            return
        for tag in tags:
            channel.basic_ack(delivery_tag=tag)

    def _requeue(self, channel: BlockingChannel, tag: int) -> None:
        """Return a delivery to its queue; it counts towards a quorum queue's
        delivery limit on every RabbitMQ version (see the module docs)."""
        self._outstanding.discard(tag)
        channel.basic_reject(delivery_tag=tag, requeue=True)

    def _give_back(self, channel: BlockingChannel, delivery: Delivery) -> None:
        """Return a delivery no handler started without spending its delivery limit.

        Raises:
            pika errors of a lost connection or channel: the caller
                reconnects; the delivery is redelivered (and counted).
        """
        tag = delivery.delivery_tag
        name = delivery.registration.name
        if _topology.queue_type(channel, name) != "quorum":
            self._outstanding.discard(tag)
            channel.basic_nack(delivery_tag=tag, requeue=True)  # in place; no limit
            return
        headers = {
            key: value
            for key, value in (delivery.properties.headers or {}).items()
            if key not in _BROKER_COUNTS
        }
        if delivery.redelivered:
            headers[_dispatch.REDELIVERED_HEADER] = True
        refused = _copy_to_queue(channel, delivery, headers)
        if refused is not None:
            log.warning(
                "Could not give an unstarted event of %s back to its queue as a copy "
                "(%s: %s); returning it, which counts towards its delivery limit",
                name,
                type(refused).__name__,
                refused,
                extra=_dispatch.fields(delivery),
            )
            self._requeue(channel, tag)
            return
        self._outstanding.discard(tag)
        channel.basic_ack(delivery_tag=tag)

    def _move(self, channel: BlockingChannel, outcome: Outcome) -> None:
        """Publish a retry or dead letter with confirm, then ack the original."""
        delivery = outcome.delivery
        registration = delivery.registration
        if outcome.action is Action.RETRY:
            refused = self._refused.get((registration.name, outcome.delay_ms))
            if refused is not None:
                outcome = _dispatch.failed(
                    delivery,
                    DelayRefusedError(refused),
                    retries=_headers.retry_count(delivery.properties.headers),
                )
                if outcome.action is Action.DISCARD:  # no dead-letter queue
                    self._ack(channel, [delivery.delivery_tag])
                    return
        if outcome.action is Action.RETRY:
            exchange, routing_key = self._declare_delay(channel, outcome)
        else:
            exchange, routing_key = _topology.dead_letter_route(registration)
        headers = _headers.without_death_headers(delivery.properties.headers)
        headers.pop(_dispatch.REDELIVERED_HEADER, None)  # only for a given-back copy
        headers.update(outcome.headers)
        try:
            self._publish(channel, outcome, exchange, routing_key, headers)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001  # never lose the delivery: requeue it
            log.error(
                "Could not move an event of %s to its %s destination (%s: %s); "
                "returning it to the queue",
                registration.name,
                outcome.action.value,
                type(exc).__name__,
                exc,
                extra=_dispatch.fields(delivery),
            )
            self._requeue(channel, delivery.delivery_tag)
            return
        self._outstanding.discard(delivery.delivery_tag)
        channel.basic_ack(delivery_tag=delivery.delivery_tag)

    def _declare_delay(self, channel: BlockingChannel, outcome: Outcome) -> tuple[str, str]:
        registration = outcome.delivery.registration
        try:
            return _topology.declare_delay(
                channel, registration, outcome.delay_ms, self._exchange_type
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            queue = _names.delay_queue(registration.name, outcome.delay_ms)
            reason = f"the broker refused the delay queue {queue!r}: {exc.reply_text}"
            self._refused[(registration.name, outcome.delay_ms)] = reason
            log.error(
                "Handler %s: %s; this delivery is redelivered, and retries with this delay "
                "are dead-lettered from now on",
                registration.name,
                reason,
                extra=_dispatch.fields(outcome.delivery),
            )
            raise

    def _publish(
        self,
        channel: BlockingChannel,
        outcome: Outcome,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
    ) -> None:
        delivery = outcome.delivery
        properties = _fit_copy(channel, outcome, headers)
        try:
            channel.basic_publish(
                exchange=exchange,
                routing_key=routing_key or delivery.routing_key,
                body=delivery.body,
                properties=properties,
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            if outcome.action is not Action.DEAD_LETTER:
                raise
            # The routing key matches no binding of the dead-letter queue:
            # put it there directly rather than lose it.
            channel.basic_publish(
                exchange="",
                routing_key=_names.dead_letter_queue(delivery.registration.name),
                body=delivery.body,
                properties=properties,
                mandatory=True,
            )


def _copy_to_queue(
    channel: BlockingChannel, delivery: Delivery, headers: dict[str, Any]
) -> Exception | None:
    """Publish a confirmed copy of ``delivery`` to its handler's queue only
    (through ``name-retry-durable``).

    Returns:
        Why the broker or pika refused it (the channel is still open), or
        ``None`` once confirmed.

    Raises:
        pika errors of a lost connection or channel.
    """
    try:
        channel.basic_publish(
            exchange=_names.durable_retry_exchange(delivery.registration.name),
            routing_key=delivery.routing_key,
            body=delivery.body,
            # A given-back copy stands in for a requeue: the publisher's
            # expiration still applies to it (unlike retry and dead-letter copies).
            properties=_headers.copy_properties(delivery.properties, headers, keep_expiration=True),
            mandatory=True,
        )
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
        refused: Exception = exc  # returned or nacked: the channel is still open
        return refused
    except CONNECTION_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001  # e.g. a header pika cannot encode
        return exc
    return None


def _fit_copy(
    channel: BlockingChannel, outcome: Outcome, headers: dict[str, Any]
) -> pika.BasicProperties:
    """The properties of ``outcome``'s copy, its headers made to encode and
    fit in the connection's ``frame_max`` (a larger content header frame
    would make the broker close the connection, and the delivery would come
    back for ever). What had to go is recorded on the copy
    (``x-dropped-headers``) and logged; see :mod:`.._amqp.frames`."""
    delivery = outcome.delivery
    properties = _headers.copy_properties(delivery.properties, headers)
    limit = _pika_internals.frame_max(channel.connection)
    fitted = _frames.fit_headers(
        properties.headers or {},
        _frames.header_budget(properties, limit),
        added=set(outcome.headers),
    )
    if fitted.dropped or fitted.shortened:
        log.warning(
            "Handler %s: the %s copy of an event %s%s%s",
            delivery.registration.name,
            outcome.action.value,
            f"has shortened header(s) {fitted.shortened}" if fitted.shortened else "",
            " and " if fitted.shortened and fitted.dropped else "",
            f"leaves out header(s) (recorded in {_headers.DROPPED_HEADERS}): "
            + "; ".join(f"{key!r}: {why}" for key, why in fitted.dropped.items())
            if fitted.dropped
            else "",
            extra=_dispatch.fields(delivery),
        )
    properties.headers = fitted.headers or None
    return properties
