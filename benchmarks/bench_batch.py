"""Batch publishing: ``Publisher.publish_many`` against raw pika's confirmed rate.

The library publishes ``--events`` events (10,000 by default) with one call to
``Publisher.publish_many``, which returns when the broker confirmed every one;
raw pika publishes the same bodies one at a time with confirms
(``confirm_delivery()``), waiting for each. Both publish persistently to
``domain-events``, routed to a durable queue (as a subscriber's is), in
``--rounds`` alternating rounds; the rates compare total events over total
time. For reference the run also times raw pika without confirms (what the
broker takes when nobody waits) and ``Publisher.publish_event`` one by one.
Issue 12's target: a batch rate of at least 5x the single-event confirmed rate.

Usage: python benchmarks/bench_batch.py [--events 10000] [--rounds 3] [--transient-queue]
"""

from __future__ import annotations

import argparse
import sys
import time

import pika
from _common import EXCHANGE, URL, bound_queue, raw_channel

from domain_event_broker import DomainEvent, Publisher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per batch")
    parser.add_argument("--single", type=int, default=2000, help="single events per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--transient-queue", action="store_true", help="route to a non-durable queue instead"
    )
    args = parser.parse_args()

    seconds = {"raw single": 0.0, "raw unconfirmed": 0.0, "library single": 0.0, "batch": 0.0}
    counts = dict.fromkeys(seconds, 0)
    with bound_queue(durable=not args.transient_queue) as queue, Publisher() as publisher:
        connection, confirmed = raw_channel()
        unconfirmed = connection.channel()
        properties = pika.BasicProperties(delivery_mode=2)
        body = DomainEvent(queue.key, {"n": 0}).to_json().encode("utf-8")
        publisher.connect()
        publisher.publish_many([DomainEvent(queue.key, {"warm": "up"})])
        queue.purge()

        def timed(name: str, count: int, action: object) -> None:
            started = time.perf_counter()
            action()  # type: ignore[operator]
            seconds[name] += time.perf_counter() - started
            counts[name] += count
            queue.purge()

        for _ in range(args.rounds):
            events = [DomainEvent(queue.key, {"n": n}) for n in range(args.events)]
            timed(
                "raw single",
                args.single,
                lambda: [
                    confirmed.basic_publish(EXCHANGE, queue.key, body, properties)
                    for _ in range(args.single)
                ],
            )
            timed("batch", args.events, lambda: publisher.publish_many(events))  # noqa: B023
            timed(
                "library single",
                args.single,
                lambda: [
                    publisher.publish_event(DomainEvent(queue.key, {"n": n}))
                    for n in range(args.single)
                ],
            )

            def raw_unconfirmed() -> None:
                for _ in range(args.events):
                    unconfirmed.basic_publish(EXCHANGE, queue.key, body, properties)
                # the broker has taken them when a synchronous call returns
                unconfirmed.queue_declare(queue.name, passive=True)

            timed("raw unconfirmed", args.events, raw_unconfirmed)
        connection.close()

    rates = {name: counts[name] / seconds[name] for name in seconds}
    kind = "transient" if args.transient_queue else "durable"
    print(f"broker {URL.split('@')[-1]}, {kind} queue, {args.rounds} rounds")
    print(f"raw pika, one at a time with confirms:  {rates['raw single']:8.0f} events/s")
    print(f"Publisher.publish_event, one at a time: {rates['library single']:8.0f} events/s")
    print(f"raw pika, no confirms:                  {rates['raw unconfirmed']:8.0f} events/s")
    print(
        f"Publisher.publish_many ({args.events} events): {rates['batch']:8.0f} events/s "
        f"(all confirmed)"
    )
    print(
        f"ratio batch / single confirmed: {rates['batch'] / rates['raw single']:.1f} "
        f"(target >= 5); batch / raw unconfirmed: "
        f"{rates['batch'] / rates['raw unconfirmed']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
