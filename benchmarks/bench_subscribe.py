"""Drain pre-filled events: Subscriber (defaults, no-op handler) vs raw pika.

Raw pika: ``basic_consume`` with prefetch 200, one ``basic_ack`` per message.
Both drain the same number of persistent events from a queue that was filled
before the clock starts. Rounds alternate; the best rate of each is kept.

Run: ``.venv/bin/python benchmarks/bench_subscribe.py [EVENTS] [ROUNDS]``
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import pika

from domain_event_broker import DomainEvent, Subscriber

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F")
TARGET = 0.6


def fill(channel: pika.adapters.blocking_connection.BlockingChannel, key: str, count: int) -> None:
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    for i in range(count):
        body = json.dumps(
            {
                "routing_key": key,
                "data": {"i": i},
                "domain_object_id": None,
                "uuid_string": str(uuid.uuid4()),
                "timestamp": time.time(),
            }
        )
        channel.basic_publish("domain-events", key, body, properties)


def raw_pika(count: int) -> float:
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.exchange_declare("domain-events", "topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, "domain-events", "bench.raw")
    fill(channel, "bench.raw", count)
    channel.basic_qos(prefetch_count=200)
    received = 0

    def on_message(ch, method, properties, body):  # type: ignore[no-untyped-def]
        nonlocal received
        json.loads(body)  # a consumer has to look at the body too
        ch.basic_ack(method.delivery_tag)
        received += 1
        if received == count:
            ch.stop_consuming()

    channel.basic_consume(name, on_message)
    started = time.perf_counter()
    channel.start_consuming()
    elapsed = time.perf_counter() - started
    channel.queue_delete(name)
    connection.close()
    return count / elapsed


def library(count: int) -> float:
    name = f"bench-lib-{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(URL)
    received = 0

    def handler(event: DomainEvent) -> None:
        nonlocal received
        received += 1
        if received == count:
            subscriber.stop_consuming()

    subscriber.register(handler, name, ["bench.lib"])
    channel = subscriber.channel
    assert channel is not None
    filler = pika.BlockingConnection(pika.URLParameters(URL))
    fill(filler.channel(), "bench.lib", count)
    filler.close()
    started = time.perf_counter()
    subscriber.start_consuming(timeout=600)
    elapsed = time.perf_counter() - started
    assert received == count, f"only {received} of {count} events handled"
    cleanup = pika.BlockingConnection(pika.URLParameters(URL))
    cleanup.channel().queue_delete(name)
    cleanup.close()
    return count / elapsed


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    raw_rates, lib_rates = [], []
    for _ in range(rounds):
        raw_rates.append(raw_pika(count))
        lib_rates.append(library(count))
    raw, lib = max(raw_rates), max(lib_rates)
    ratio = lib / raw
    print(f"subscribe: {count} events x {rounds} rounds (best of each)")
    print(f"  raw pika (prefetch 200, ack each): {raw:9.0f} events/s")
    print(f"  Subscriber (defaults, no-op)     : {lib:9.0f} events/s")
    print(f"  ratio: {ratio:.2f} (target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
