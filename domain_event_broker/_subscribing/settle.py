"""Carrying out outcomes on the channel (I/O thread only).

An acknowledgement is sent only after the handler returned, or after the
event's copy was confirmed into its retry or dead-letter destination. When a
copy cannot be placed, the delivery goes back to its queue with an ERROR
line; the worker goes on with the next one.
"""

from __future__ import annotations

import logging
from typing import Any

import pika
import pika.data
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import names as _names
from .._amqp.connect import CONNECTION_ERRORS
from .._core import headers as _headers
from . import dispatch as _dispatch
from . import topology as _topology
from .dispatch import Action, Outcome

__all__ = ["Settler"]

log = logging.getLogger(__name__)


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
            if outcome.action in (Action.SKIP, Action.STOP):
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
        self._outstanding.discard(tag)
        channel.basic_nack(delivery_tag=tag, requeue=True)

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
        try:
            properties = _headers.copy_properties(delivery.properties, headers)
            _encode_check(headers)
        except Exception:  # noqa: BLE001  # a header pika cannot encode: drop those
            kept = _encodable(headers)
            log.warning(
                "Handler %s: dropped header(s) %s that cannot be encoded from a %s copy",
                delivery.registration.name,
                sorted(set(headers) - set(kept), key=repr),
                outcome.action.value,
                extra=_dispatch.fields(delivery),
            )
            properties = _headers.copy_properties(delivery.properties, kept)
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


def _encode_check(headers: dict[str, Any]) -> None:
    pika.data.encode_table([], headers)


def _encodable(headers: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in headers.items():
        try:
            _encode_check({key: value})
        except Exception:  # noqa: BLE001, S112  # leave out what cannot be encoded
            continue
        kept[key] = value
    return kept
