"""Drain pre-filled events: Subscriber (defaults, no-op handler) vs raw pika.

Raw pika: ``basic_consume`` with prefetch 200, ``json.loads`` of each body,
one ``basic_ack`` per message. Both drain the same number of persistent
events from a durable queue that was filled before the clock starts. Rounds
alternate (raw, library, raw, ...); printed are the best rate of each, the
median of the rounds' ratios (each library round against the raw round just
before it), and the client's CPU time (user + system, all threads) per event.

Run: ``.venv/bin/python benchmarks/bench_subscribe.py [EVENTS] [ROUNDS]``
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel

from domain_event_broker import DomainEvent, Subscriber

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]
TARGET = 1.0


def fill(channel: BlockingChannel, queue: str, key: str, count: int) -> None:
    """Publish ``count`` persistent events for ``key`` and wait until ``queue`` holds them."""
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
    deadline = time.monotonic() + 120
    while channel.queue_declare(queue, passive=True).method.message_count < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue} was not filled with {count} events")
        channel.connection.sleep(0.05)


class Drain:
    """One timed drain: its rate (events/s) and client CPU per event (µs)."""

    def __init__(self, count: int, run: Callable[[], None]) -> None:
        cpu_before, started = time.process_time(), time.perf_counter()
        run()
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu_before
        self.rate = count / elapsed
        self.cpu_us = used / count * 1e6


def raw_pika(count: int) -> Drain:
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.exchange_declare("domain-events", "topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, "domain-events", "bench.raw")
    try:
        fill(channel, name, "bench.raw", count)
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
        return Drain(count, channel.start_consuming)
    finally:
        channel.queue_delete(name)
        connection.close()


def library(count: int) -> Drain:
    name = f"bench-lib-{uuid.uuid4().hex[:8]}"
    subscriber = Subscriber(URL)
    received = 0

    def handler(event: DomainEvent) -> None:
        nonlocal received
        received += 1
        if received == count:
            subscriber.stop_consuming()

    subscriber.register(handler, name, ["bench.lib"])
    filler = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        fill(filler.channel(), name, "bench.lib", count)
        drain = Drain(count, lambda: subscriber.start_consuming(timeout=600))
        assert received == count, f"only {received} of {count} events handled"
        return drain
    finally:
        filler.channel().queue_delete(name)
        filler.close()
        subscriber.close()


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    raws: list[Drain] = []
    libs: list[Drain] = []
    for _ in range(rounds):
        raws.append(raw_pika(count))
        libs.append(library(count))
    raw = max(drain.rate for drain in raws)
    lib = max(drain.rate for drain in libs)
    paired = statistics.median(lib.rate / raw.rate for raw, lib in zip(raws, libs, strict=True))
    cpu_paired = statistics.median(
        lib.cpu_us / raw.cpu_us for raw, lib in zip(raws, libs, strict=True)
    )
    print(f"subscribe: {count} events x {rounds} rounds")
    print(
        f"  raw pika (prefetch 200, ack each): {raw:9.0f} events/s (best), "
        f"CPU {statistics.median(d.cpu_us for d in raws):5.1f} µs/event (median)"
    )
    print(
        f"  Subscriber (defaults, no-op)     : {lib:9.0f} events/s (best), "
        f"CPU {statistics.median(d.cpu_us for d in libs):5.1f} µs/event (median)"
    )
    print(
        f"  ratio of bests: {lib / raw:.2f}, median of paired rounds: {paired:.2f} "
        f"(target >= {TARGET}); client CPU per event, library / raw: {cpu_paired:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
