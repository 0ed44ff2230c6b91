"""Publishing throughput: ``publish_domain_event`` against raw pika.

Both publish the same JSON bodies, persistently, to the ``domain-events``
exchange and wait for publisher confirms one message at a time: raw pika on
one channel (``confirm_delivery()``, one ``basic_publish`` per message), the
library with its defaults (shared connection, confirms). Rounds alternate so
that drift in the shared broker's load hits both alike; the median round of
each is compared. Issue 2's target: a ratio of at least 0.8.

``--with-302`` also times domain-event-broker 3.0.2 (a connection per event),
imported from its wheel in a subprocess, for reference.

Usage: python benchmarks/bench_publish.py [--events 5000] [--rounds 3] [--with-302]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import textwrap
import time
import uuid

import pika

from domain_event_broker import DomainEvent, publish_domain_event

URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]
EXCHANGE = "domain-events"


def bench_raw(
    channel: pika.adapters.blocking_connection.BlockingChannel, key: str, bodies: list[bytes]
) -> float:
    properties = pika.BasicProperties(delivery_mode=2)
    started = time.perf_counter()
    for body in bodies:
        channel.basic_publish(EXCHANGE, key, body, properties)
    return len(bodies) / (time.perf_counter() - started)


def bench_library(key: str, payloads: list[dict[str, int]]) -> float:
    started = time.perf_counter()
    for data in payloads:
        publish_domain_event(key, data)
    return len(payloads) / (time.perf_counter() - started)


def bench_302(key: str, count: int) -> float | None:
    wheels = sorted(glob.glob("build/**/domain_event_broker-3.0.2-*.whl", recursive=True))
    wheels += sorted(glob.glob("/tmp/deb302/domain_event_broker-3.0.2-*.whl"))
    if not wheels:
        print("3.0.2: no wheel found (run `make compat` once); skipped")
        return None
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {wheels[0]!r})
        from domain_event_broker import publish_domain_event
        publish_domain_event({key!r}, {{"n": -1}}, connection_settings={URL!r})
        started = time.perf_counter()
        for n in range({count}):
            publish_domain_event({key!r}, {{"n": n}}, connection_settings={URL!r})
        print({count} / (time.perf_counter() - started))
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(result.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with-302", action="store_true", help="also time 3.0.2 (slow)")
    args = parser.parse_args()

    key = f"bench.publish-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    # A queue for the events to land in (purged after each round), so that the
    # broker does the same work as for a real subscriber.
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue, EXCHANGE, routing_key=key)

    payloads = [{"n": n} for n in range(args.events)]
    bodies = [DomainEvent(key, data).to_json().encode("utf-8") for data in payloads]
    publish_domain_event(key, {"n": -1})  # connect once, as a long-running app would
    bench_raw(channel, key, bodies[:10])
    channel.queue_purge(queue)

    raw_rates: list[float] = []
    library_rates: list[float] = []
    print(f"{args.events} events per round, {args.rounds} rounds, broker {URL.split('@')[-1]}")
    for round_number in range(1, args.rounds + 1):
        raw_rates.append(bench_raw(channel, key, bodies))
        channel.queue_purge(queue)
        library_rates.append(bench_library(key, payloads))
        channel.queue_purge(queue)
        print(
            f"  round {round_number}: raw pika {raw_rates[-1]:8.0f}/s   "
            f"publish_domain_event {library_rates[-1]:8.0f}/s"
        )

    raw = statistics.median(raw_rates)
    library = statistics.median(library_rates)
    print(f"raw pika (confirms, one channel): {raw:8.0f} events/s (median)")
    print(f"publish_domain_event (defaults):  {library:8.0f} events/s (median)")
    print(f"ratio: {library / raw:.2f} (target >= 0.80)")
    if args.with_302:
        count = max(100, args.events // 10)
        rate = bench_302(key, count)
        if rate is not None:
            print(
                f"3.0.2 publish_domain_event:       {rate:8.0f} events/s ({count} events); "
                f"ratio {rate / raw:.2f}"
            )
        channel.queue_purge(queue)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
