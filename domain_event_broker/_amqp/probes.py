"""Does a queue or an exchange exist: a passive declaration on a spare channel.

A passive declaration of something that does not exist makes the broker
close the channel with ``404 NOT_FOUND`` (``pika.spec.NOT_FOUND``): each
probe runs on a channel of its own, so that the caller's channel survives,
and closes it when the broker did not. Reply codes are ``pika.spec``'s
throughout the package; none is defined here.
"""

from __future__ import annotations

from typing import NamedTuple

import pika
import pika.exceptions
import pika.spec

__all__ = ["Probe", "exchange_exists", "probe_exchange", "probe_queue", "queue_exists"]


class Probe(NamedTuple):
    """What a passive declaration found.

    Attributes:
        name: the queue or exchange asked about.
        not_found: the broker's ``404 NOT_FOUND`` when it does not exist
            (to chain to an error of this library), else ``None``.
        messages: a queue's ready messages (0 for an exchange or when missing).
        consumers: a queue's consumers (0 for an exchange or when missing).
    """

    name: str
    not_found: pika.exceptions.ChannelClosedByBroker | None = None
    messages: int = 0
    consumers: int = 0

    @property
    def exists(self) -> bool:
        return self.not_found is None


def probe_queue(connection: pika.BlockingConnection, queue: str) -> Probe:
    """Whether ``queue`` exists, with its message and consumer counts.

    Raises:
        pika.exceptions.ChannelClosedByBroker: the broker refused otherwise
            (e.g. ``403 ACCESS_REFUSED``).
        Any of pika's connection errors: the connection was lost.
    """
    return _probe(connection, queue, is_queue=True)


def probe_exchange(connection: pika.BlockingConnection, exchange: str) -> Probe:
    """Whether ``exchange`` exists.

    Raises:
        As :func:`probe_queue`.
    """
    return _probe(connection, exchange, is_queue=False)


def queue_exists(connection: pika.BlockingConnection, queue: str) -> bool:
    """Whether ``queue`` exists (raises as :func:`probe_queue`)."""
    return probe_queue(connection, queue).exists


def exchange_exists(connection: pika.BlockingConnection, exchange: str) -> bool:
    """Whether ``exchange`` exists (raises as :func:`probe_queue`)."""
    return probe_exchange(connection, exchange).exists


def _probe(connection: pika.BlockingConnection, name: str, *, is_queue: bool) -> Probe:
    channel = connection.channel()
    try:
        if is_queue:
            method = channel.queue_declare(name, passive=True).method
            found = Probe(name, None, int(method.message_count), int(method.consumer_count))
        else:
            channel.exchange_declare(name, passive=True)
            found = Probe(name)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == pika.spec.NOT_FOUND:
            return Probe(name, exc)
        raise
    if channel.is_open:
        channel.close()
    return found
