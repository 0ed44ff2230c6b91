"""Shared set-up for the benchmarks: the broker URL and a queue to publish into."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pika
from pika.adapters.blocking_connection import BlockingChannel

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]
EXCHANGE = "domain-events"


def raw_channel(confirm: bool = True) -> tuple[pika.BlockingConnection, BlockingChannel]:
    """A raw pika connection and channel (in confirm mode unless told)."""
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    if confirm:
        channel.confirm_delivery()
    return connection, channel


class BenchQueue:
    """A queue the benchmark publishes into, with a routing key only it receives."""

    def __init__(self, channel: BlockingChannel, name: str, key: str) -> None:
        self.channel = channel
        self.name = name
        self.key = key

    def purge(self) -> None:
        self.channel.queue_purge(self.name)

    def count(self) -> int:
        return int(self.channel.queue_declare(self.name, passive=True).method.message_count)


@contextmanager
def bound_queue(durable: bool = True) -> Iterator[BenchQueue]:
    """A queue bound to ``domain-events`` with a unique routing key; deleted after.

    Durable by default, as a subscriber's queues are: the broker writes
    persistent events to disk before confirming them. A non-durable one is
    exclusive (RabbitMQ 4.3 refuses transient non-exclusive queues).

    Yields:
        The queue.
    """
    key = f"bench.{uuid.uuid4().hex[:8]}"
    connection, channel = raw_channel(confirm=False)
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    queue = f"bench-{key}"
    channel.queue_declare(queue, durable=durable, exclusive=not durable, auto_delete=not durable)
    channel.queue_bind(queue, EXCHANGE, routing_key=key)
    try:
        yield BenchQueue(channel, queue, key)
    finally:
        channel.queue_delete(queue)
        connection.close()
