"""Benchmark: replay runs over 10,000 and 100,000 dead letters.

For each size, three runs over a handler's dead-letter queue:

* ``leave``: ``replay_dead_letters`` with a callback answering LEAVE to all;
* ``retry``: the default callback (RETRY to all);
* ``filtered``: ``where=DeadLetterFilter(exception="KeyError")`` over dead
  letters half of which match: those are replayed, the others kept.

Measured per run: the time per event; the slowest confirmed publish of a
new dead letter into the same ``-dl`` queue during the run (a second
connection publishes one every 50 ms); the client's memory growth (RSS)
during the run. Beside each size, raw pika does the RETRY work by hand
(``basic_get``, publish to the retry exchange, ack, ``tx.commit`` every 100)
on the same broker, and the ratio is printed.

Targets (from issue 16): time per event at the larger size at most 1.5 x
the smaller's; slowest confirmed publish under 1 s; memory growth at the
larger size under 50 MB.

Run: ``.venv/bin/python benchmarks/bench_replay.py [--sizes 10000 100000]
[--url URL]``. CPU is shared: run the 100,000 case sparingly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from domain_event_broker import DomainEvent
from domain_event_broker.replay import LEAVE, DeadLetterFilter, replay_dead_letters

TARGET_SCALING = 1.5
TARGET_SLOWEST_PUBLISH = 1.0
TARGET_MEMORY_MB = 50.0
PROBE_INTERVAL = 0.05


def declare_handler(channel: BlockingChannel, name: str) -> None:
    """The topology ``register(..., dead_letter=True)`` declares."""
    key = f"{name}.*"
    channel.exchange_declare(f"{name}-dlx", exchange_type="topic")
    channel.queue_declare(f"{name}-dl", durable=True)
    channel.queue_bind(f"{name}-dl", f"{name}-dlx", key)
    channel.queue_declare(name, durable=True, arguments={"x-dead-letter-exchange": f"{name}-dlx"})
    channel.exchange_declare(f"{name}-retry", exchange_type="topic")
    channel.queue_bind(name, f"{name}-retry", key)


def delete_handler(channel: BlockingChannel, name: str) -> None:
    channel.queue_delete(name)
    channel.queue_delete(f"{name}-dl")
    channel.exchange_delete(f"{name}-retry")
    channel.exchange_delete(f"{name}-dlx")


def fill(channel: BlockingChannel, name: str, count: int) -> None:
    """``count`` dead letters as the subscriber writes them; every other one a KeyError."""
    for n in range(count):
        event = DomainEvent(routing_key=f"{name}.happened", data={"n": n})
        channel.basic_publish(
            f"{name}-dlx",
            event.routing_key,
            event.to_json().encode(),
            pika.BasicProperties(
                delivery_mode=2,
                content_type="application/json",
                message_id=event.uuid_string,
                headers={
                    "x-exception-type": "builtins.KeyError" if n % 2 else "app.Timeout",
                    "x-exception-message": "benchmark",
                    "x-failed-handler": "bench.handler",
                    "x-failed-at": int(time.time()),
                    "x-retry-count": 1,
                },
            ),
        )
    wait_count(channel, f"{name}-dl", count)


def wait_count(channel: BlockingChannel, queue: str, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while (found := channel.queue_declare(queue, passive=True).method.message_count) != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{queue} holds {found} messages, not {count}")
        time.sleep(0.1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Probe(threading.Thread):
    """Publishes a dead letter into ``name-dl`` every 50 ms, with confirms,
    and samples the process's memory, until stopped."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.url, self.name = url, name
        self.slowest = 0.0
        self.published = 0
        self.peak_rss = rss_bytes()
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            channel = connection.channel()
            channel.confirm_delivery()
            while not self._stop_event.wait(PROBE_INTERVAL):
                started = time.perf_counter()
                channel.basic_publish(
                    f"{self.name}-dlx",
                    f"{self.name}.late",
                    b'{"late": true}',
                    pika.BasicProperties(delivery_mode=2),
                    mandatory=True,
                )
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.published += 1
                self.peak_rss = max(self.peak_rss, rss_bytes())
            connection.close()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)
        if self.error is not None:
            raise self.error


@dataclass
class Run:
    kind: str
    count: int
    seconds: float
    slowest_publish: float
    memory_mb: float

    @property
    def per_event_us(self) -> float:
        return self.seconds / self.count * 1e6


def leave_all(**kwargs: Any) -> str:
    return LEAVE


KINDS: dict[str, Callable[[str, str], Any]] = {
    "leave": lambda name, url: replay_dead_letters(name, leave_all, url),
    "retry": lambda name, url: replay_dead_letters(name, connection_settings=url),
    "filtered": lambda name, url: replay_dead_letters(
        name, connection_settings=url, where=DeadLetterFilter(exception="KeyError")
    ),
}


def measure(channel: BlockingChannel, url: str, kind: str, count: int) -> Run:
    name = f"bench-replay-{kind}-{uuid.uuid4().hex[:8]}"
    declare_handler(channel, name)
    try:
        fill(channel, name, count)
        probe = Probe(url, name)
        before = rss_bytes()
        probe.start()
        started = time.perf_counter()
        result = KINDS[kind](name, url)
        seconds = time.perf_counter() - started
        probe.stop()
        expected = {
            "leave": (0, count),
            "retry": (count, 0),
            "filtered": (count // 2, count - count // 2),
        }
        replayed, kept = expected[kind]
        if result.replayed != replayed or result.left + result.skipped != kept:
            raise SystemExit(f"{kind}: unexpected result {result}")
        return Run(kind, count, seconds, probe.slowest, (probe.peak_rss - before) / 2**20)
    finally:
        delete_handler(channel, name)


def raw_pika_retry(channel: BlockingChannel, count: int) -> float:
    """The RETRY work written by hand with raw pika: seconds taken."""
    name = f"bench-replay-raw-{uuid.uuid4().hex[:8]}"
    declare_handler(channel, name)
    try:
        fill(channel, name, count)
        work = channel.connection.channel()
        work.tx_select()
        started = time.perf_counter()
        for n in range(count):
            method, properties, body = work.basic_get(f"{name}-dl")
            work.basic_publish(f"{name}-retry", method.routing_key, body, properties)
            work.basic_ack(method.delivery_tag)
            if n % 100 == 99:
                work.tx_commit()
        work.tx_commit()
        seconds = time.perf_counter() - started
        work.close()
        return seconds
    finally:
        delete_handler(channel, name)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # so that the queues are deleted


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument(
        "--url",
        default=os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F"),
    )
    args = parser.parse_args()
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    runs: list[Run] = []
    raw: dict[int, float] = {}
    try:
        for count in args.sizes:
            raw[count] = raw_pika_retry(channel, count)
            print(
                f"raw pika RETRY    {count:>7}: {raw[count] / count * 1e6:7.1f} us/event",
                flush=True,
            )
            for kind in args.kinds:
                run = measure(channel, args.url, kind, count)
                runs.append(run)
                ratio = run.seconds / raw[count]
                print(
                    f"{kind:<8} {count:>7} dead letters: {run.seconds:7.2f} s  "
                    f"{run.per_event_us:7.1f} us/event  (x{ratio:.2f} raw pika)  "
                    f"slowest confirmed publish {run.slowest_publish * 1000:6.1f} ms  "
                    f"memory +{run.memory_mb:.1f} MB",
                    flush=True,
                )
    finally:
        connection.close()

    ok = True
    smallest, largest = min(args.sizes), max(args.sizes)
    print()
    for kind in args.kinds:
        small = next(r for r in runs if r.kind == kind and r.count == smallest)
        large = next(r for r in runs if r.kind == kind and r.count == largest)
        scaling = large.per_event_us / small.per_event_us
        # The same, each size divided by raw pika's at that size: on a shared
        # machine the broker's speed varies from minute to minute.
        normalized = (large.seconds / raw[largest]) / (small.seconds / raw[smallest])
        slowest = max(r.slowest_publish for r in runs if r.kind == kind)
        verdict = (
            scaling <= TARGET_SCALING
            and slowest < TARGET_SLOWEST_PUBLISH
            and large.memory_mb < TARGET_MEMORY_MB
        )
        ok = ok and verdict
        print(
            f"{kind:<8}: per event {small.per_event_us:.1f} us at {smallest}, "
            f"{large.per_event_us:.1f} us at {largest} (x{scaling:.2f}, target <= "
            f"{TARGET_SCALING}; x{normalized:.2f} relative to raw pika); "
            f"slowest publish {slowest * 1000:.0f} ms (< 1000); "
            f"memory +{large.memory_mb:.1f} MB at {largest} (< {TARGET_MEMORY_MB:g})"
            f"  {'OK' if verdict else 'MISSED'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
