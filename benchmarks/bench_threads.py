"""Publishing from many threads: ``publish_domain_event`` against raw pika.

Each side runs ``--threads`` threads in this process, each publishing its
share of ``--events`` confirmed, persistent events to ``domain-events``
(routed to a durable queue, as a subscriber's is): raw pika with one
connection per thread (``confirm_delivery()``), the library with
``publish_domain_event`` and its defaults (a pool of connections, one per
thread publishing at the same moment, up to ``configure(max_connections=...)``).
The sides alternate for ``--rounds`` rounds; the rates compare total events
over total time. Issue 12's target: a ratio of at least 0.9 with 4 and with
16 threads.

Raw pika publishes one pre-encoded body with only ``delivery_mode`` set. As a
second reference, "raw pika, same events" builds each event as an application
must (a ``DomainEvent``, its JSON body, the library's AMQP properties:
``content_type``, ``message_id``, ``timestamp``) and publishes it with raw
pika on one connection per thread: the same bytes on the wire as the library.
The difference between the two references is the cost of the event itself,
which CPU contention (many threads, the GIL, a busy machine) magnifies.

Usage: python benchmarks/bench_threads.py [--threads 4 16] [--events 4000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable

import pika
from _common import EXCHANGE, URL, BenchQueue, bound_queue, raw_channel

from domain_event_broker import DomainEvent, publish_domain_event
from domain_event_broker.publish import _event_properties, _shared, close_shared_publishers


def run_threads(threads: int, work: Callable[[int], None]) -> float:
    """Run ``work(thread_index)`` on ``threads`` threads at once; the seconds taken."""
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        start.wait()
        try:
            work(index)
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def bench_raw(queue: BenchQueue, threads: int, per_thread: int, body: bytes) -> float:
    channels = [raw_channel() for _ in range(threads)]  # connected beforehand, like a warm app
    properties = pika.BasicProperties(delivery_mode=2)

    def work(index: int) -> None:
        channel = channels[index][1]
        for _ in range(per_thread):
            channel.basic_publish(EXCHANGE, queue.key, body, properties)

    seconds = run_threads(threads, work)
    for connection, _ in channels:
        connection.close()
    return threads * per_thread / seconds


def bench_raw_events(queue: BenchQueue, threads: int, per_thread: int) -> float:
    channels = [raw_channel() for _ in range(threads)]

    def work(index: int) -> None:
        channel = channels[index][1]
        for n in range(per_thread):
            event = DomainEvent(queue.key, {"n": n})
            body = event.to_json().encode("utf-8")
            channel.basic_publish(EXCHANGE, queue.key, body, _event_properties(event))

    seconds = run_threads(threads, work)
    for connection, _ in channels:
        connection.close()
    return threads * per_thread / seconds


def bench_library(queue: BenchQueue, threads: int, per_thread: int) -> float:
    def work(index: int) -> None:
        for n in range(per_thread):
            publish_domain_event(queue.key, {"n": n})

    return threads * per_thread / run_threads(threads, work)


def pool_size() -> int:
    return sum(pool.size for pool in _shared.values())


def measure(threads: int, events: int, rounds: int) -> float:
    per_thread = max(1, events // threads // rounds)
    with bound_queue() as queue:
        body = DomainEvent(queue.key, {"n": 0}).to_json().encode("utf-8")
        bench_library(queue, threads, 5)  # warm up: the pool's connections
        queue.purge()
        seconds = {"raw": 0.0, "raw events": 0.0, "library": 0.0}
        ratios = []
        for round_number in range(rounds):
            rates = {}
            order = list(seconds) if round_number % 2 == 0 else list(reversed(seconds))
            for name in order:
                if name == "raw":
                    rates[name] = bench_raw(queue, threads, per_thread, body)
                elif name == "raw events":
                    rates[name] = bench_raw_events(queue, threads, per_thread)
                else:
                    rates[name] = bench_library(queue, threads, per_thread)
                queue.purge()
                seconds[name] += threads * per_thread / rates[name]
            ratios.append(rates["library"] / rates["raw"])
        total = threads * per_thread * rounds
        raw_rate, events_rate, library_rate = (total / seconds[name] for name in seconds)
        print(
            f"{threads:3} threads ({total} events): raw pika {raw_rate:6.0f}/s, "
            f"raw pika same events {events_rate:6.0f}/s, publish_domain_event "
            f"{library_rate:6.0f}/s ({pool_size()} connection(s))\n"
            f"    ratio to raw pika {library_rate / raw_rate:.2f} (target >= 0.90; rounds: median "
            f"{statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}); "
            f"to raw pika publishing the same events {library_rate / events_rate:.2f}"
        )
    close_shared_publishers()
    return float(library_rate / raw_rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--events", type=int, default=8000, help="per thread count, all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(
        f"broker {URL.split('@')[-1]}, {args.events} events per thread count, {args.rounds} rounds"
    )
    for threads in args.threads:
        measure(threads, args.events, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
