"""The "does it exist" probes: a passive declaration on a spare channel."""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pika.exceptions
import pika.spec
import pytest

from domain_event_broker._amqp.probes import (
    exchange_exists,
    probe_exchange,
    probe_queue,
    queue_exists,
)

from .conftest import Names

#: Few channels: a probe that left its spare channel open would run out of them.
CHANNEL_MAX = 4


@pytest.fixture
def connection(broker_url: str) -> Iterator[pika.BlockingConnection]:
    parameters = pika.URLParameters(broker_url)
    parameters.channel_max = CHANNEL_MAX
    opened = pika.BlockingConnection(parameters)
    yield opened
    if opened.is_open:
        opened.close()


def test_a_queue_that_exists_with_its_counts(
    connection: pika.BlockingConnection, names: Names
) -> None:
    queue = names.new("test-probes")
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.basic_publish("", queue, b"one")
    channel.basic_publish("", queue, b"two")
    channel.basic_consume(queue, lambda *args: None)

    found = probe_queue(connection, queue)

    assert found.exists and found.not_found is None
    assert found.consumers == 1
    assert found.messages == 0  # both delivered to the consumer
    assert queue_exists(connection, queue)
    assert channel.is_open


def test_a_missing_queue_and_exchange(connection: pika.BlockingConnection, names: Names) -> None:
    missing = names.new("test-probes")
    channel = connection.channel()

    found = probe_queue(connection, missing)

    assert not found.exists
    assert isinstance(found.not_found, pika.exceptions.ChannelClosedByBroker)
    assert found.not_found.reply_code == pika.spec.NOT_FOUND
    assert (found.messages, found.consumers) == (0, 0)
    assert not queue_exists(connection, missing)
    assert not exchange_exists(connection, missing)
    assert probe_exchange(connection, missing).not_found is not None
    assert channel.is_open  # the caller's channel is not the one the broker closed
    assert not queue_exists(connection, missing)  # nothing was created


def test_an_exchange_that_exists(connection: pika.BlockingConnection, names: Names) -> None:
    exchange = names.new("test-probes")
    names.exchanges.append(exchange)
    connection.channel().exchange_declare(exchange, "topic")

    assert exchange_exists(connection, exchange)
    assert probe_exchange(connection, exchange).exists


def test_every_spare_channel_is_closed(connection: pika.BlockingConnection, names: Names) -> None:
    queue = names.new("test-probes")
    connection.channel().queue_declare(queue, durable=True)
    for _ in range(3 * CHANNEL_MAX):
        assert queue_exists(connection, queue)
        assert exchange_exists(connection, "amq.topic")
        assert not queue_exists(connection, queue + "-missing")
