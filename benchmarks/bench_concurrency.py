"""Slow handlers: a handler that waits 10 ms, concurrency=8 vs concurrency=1.

Also raw pika consuming the same way (one callback at a time, 10 ms each) as
the reference a single-threaded consumer gets. Every run drains the same
number of pre-filled persistent events.

Run: ``.venv/bin/python benchmarks/bench_concurrency.py [EVENTS] [ROUNDS]``
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import pika
from bench_subscribe import fill

from domain_event_broker import DomainEvent, Subscriber

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F")
PAUSE = 0.010
TARGET = 6.0


def raw_pika(count: int) -> float:
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.exchange_declare("domain-events", "topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, "domain-events", name)
    fill(channel, name, name, count)
    channel.basic_qos(prefetch_count=20)
    received = 0

    def on_message(ch, method, properties, body):  # type: ignore[no-untyped-def]
        nonlocal received
        time.sleep(PAUSE)
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


def library(count: int, concurrency: int) -> float:
    name = f"bench-conc-{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(URL)
    received = 0

    def handler(event: DomainEvent) -> None:
        nonlocal received
        time.sleep(PAUSE)
        received += 1  # races are harmless: only the stop condition reads it
        if received >= count:
            subscriber.stop_consuming()

    subscriber.register(handler, name, [name], concurrency=concurrency)
    filler = pika.BlockingConnection(pika.URLParameters(URL))
    fill(filler.channel(), name, name, count)
    filler.close()
    started = time.perf_counter()
    subscriber.start_consuming(timeout=600)
    elapsed = time.perf_counter() - started
    cleanup = pika.BlockingConnection(pika.URLParameters(URL))
    cleanup.channel().queue_delete(name)
    cleanup.close()
    return count / elapsed


def main() -> int:
    count = min(int(sys.argv[1]) if len(sys.argv) > 1 else 800, 2000)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    raw, one, eight = [], [], []
    for _ in range(rounds):
        raw.append(raw_pika(count // 4))
        one.append(library(count // 4, 1))
        eight.append(library(count, 8))
    print(f"slow handler ({PAUSE * 1000:.0f} ms): {count} events x {rounds} rounds (best of each)")
    print(f"  raw pika, one callback at a time: {max(raw):7.0f} events/s")
    print(f"  Subscriber, concurrency=1       : {max(one):7.0f} events/s")
    print(f"  Subscriber, concurrency=8       : {max(eight):7.0f} events/s")
    print(f"  concurrency=8 / concurrency=1: {max(eight) / max(one):.2f} (target >= {TARGET})")
    print(f"  concurrency=8 / raw pika     : {max(eight) / max(raw):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
