"""Classic vs quorum handlers: publish and consume, each beside raw pika.

For each queue type, four rates (events per second):

- publish, library: ``Publisher.publish_event`` (one confirm per event) to
  ``domain-events``, routed to one handler queue of that type;
- publish, raw pika: ``basic_publish`` with confirms, the same routing;
- consume, library: a ``Subscriber`` (defaults, no-op handler) draining the
  pre-filled queue of that type;
- consume, raw pika: ``basic_consume`` with prefetch 20 (the Subscriber's
  default), one ``basic_ack`` per message, body decoded.

Ratios printed: library / raw pika per type (what the library costs on that
type), and quorum / classic for each (what the queue type costs). Rounds
alternate; the best rate of each is kept.

Run: ``.venv/bin/python benchmarks/bench_queue_types.py [EVENTS] [ROUNDS]``
(``DOMAIN_EVENT_BROKER`` names the broker; a cluster's URLs give quorum
queues their replicas).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable

import pika

from domain_event_broker import DomainEvent, Publisher, Subscriber

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]
EXCHANGE = "domain-events"


def _queue(channel: pika.adapters.blocking_connection.BlockingChannel, queue_type: str) -> str:
    name = f"bench-qt-{queue_type}-{uuid.uuid4().hex[:8]}"
    channel.exchange_declare(EXCHANGE, "topic", durable=True)
    channel.queue_declare(name, durable=True, arguments={"x-queue-type": queue_type})
    channel.queue_bind(name, EXCHANGE, name)
    return name


def _body(key: str, i: int) -> str:
    return DomainEvent(key, {"i": i}).to_json()


def publish_raw(queue_type: str, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    name = _queue(channel, queue_type)
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    start = time.perf_counter()
    for i in range(count):
        channel.basic_publish(EXCHANGE, name, _body(name, i), properties)
    elapsed = time.perf_counter() - start
    channel.queue_delete(name)
    connection.close()
    return count / elapsed


def publish_library(queue_type: str, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    name = _queue(channel, queue_type)
    with Publisher(URL) as publisher:
        publisher.publish_event(DomainEvent(name, {"i": -1}))  # connect first
        start = time.perf_counter()
        for i in range(count):
            publisher.publish_event(DomainEvent(name, {"i": i}))
        elapsed = time.perf_counter() - start
    channel.queue_delete(name)
    connection.close()
    return count / elapsed


def _fill(name: str, count: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2)
    for i in range(count):
        channel.basic_publish(EXCHANGE, name, _body(name, i), properties)
    connection.close()


def consume_raw(queue_type: str, count: int) -> float:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    name = _queue(channel, queue_type)
    _fill(name, count)
    channel.basic_qos(prefetch_count=20)
    received = 0

    def on_message(ch, method, properties, body):  # type: ignore[no-untyped-def]
        nonlocal received
        json.loads(body)
        ch.basic_ack(method.delivery_tag)
        received += 1
        if received == count:
            ch.stop_consuming()

    channel.basic_consume(name, on_message)
    start = time.perf_counter()
    channel.start_consuming()
    elapsed = time.perf_counter() - start
    channel.queue_delete(name)
    connection.close()
    return count / elapsed


def consume_library(queue_type: str, count: int) -> float:
    name = f"bench-qt-lib-{queue_type}-{uuid.uuid4().hex[:8]}"
    received = 0
    subscriber = Subscriber(URL)

    def handler(event: DomainEvent) -> None:
        nonlocal received
        received += 1
        if received == count:
            subscriber.stop_consuming()

    subscriber.register(handler, name, [name], queue_type=queue_type)
    _fill(name, count)
    start = time.perf_counter()
    subscriber.start_consuming(timeout=120)
    elapsed = time.perf_counter() - start
    channel = subscriber.channel
    assert channel is not None
    channel.queue_delete(name)
    for exchange in (f"{name}-retry", f"{name}-retry-durable"):
        channel.exchange_delete(exchange)
    subscriber.close()
    if received != count:
        raise RuntimeError(f"consumed {received} of {count}")
    return count / elapsed


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    runs: dict[str, Callable[[str, int], float]] = {
        "publish library": publish_library,
        "publish raw pika": publish_raw,
        "consume library": consume_library,
        "consume raw pika": consume_raw,
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for queue_type in ("classic", "quorum"):
            for label, run in runs.items():
                rate = run(queue_type, count)
                key = (label, queue_type)
                best[key] = max(best.get(key, 0.0), rate)
    print(f"{count} events, best of {rounds} rounds, events/s")
    print(f"{'':18}{'classic':>10}{'quorum':>10}{'quorum/classic':>16}")
    for label in runs:
        classic, quorum = best[(label, "classic")], best[(label, "quorum")]
        print(f"{label:18}{classic:10.0f}{quorum:10.0f}{quorum / classic:16.2f}")
    for action in ("publish", "consume"):
        ratios = [
            best[(f"{action} library", t)] / best[(f"{action} raw pika", t)]
            for t in ("classic", "quorum")
        ]
        print(f"{action} library/raw pika: classic {ratios[0]:.2f}, quorum {ratios[1]:.2f}")


if __name__ == "__main__":
    main()
