"""Benchmark: ``replay_all`` moving 1,000 dead letters, this library vs 3.0.2.

Both run in the same invocation against the same broker, each on its own
handler holding the same 1,000 dead letters. 3.0.2 has the same module name,
so it is installed from the package index into a separate virtualenv
(``build/bench-302-venv``) and run in a subprocess there; its time is taken
inside that process, around the ``replay_all`` call only.

Run: ``.venv/bin/python benchmarks/bench_replay.py [--count N] [--url URL]``.
Target: at least 10 times faster than 3.0.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
import venv
from pathlib import Path

import pika

from domain_event_broker import DomainEvent
from domain_event_broker.replay import replay_all

ROOT = Path(__file__).resolve().parent.parent
OLD_VENV = ROOT / "build" / "bench-302-venv"
OLD_VERSION = "3.0.2"
TARGET_SPEEDUP = 10.0

OLD_REPLAY = """
import json, sys, time
from domain_event_broker.replay import replay_all
name, url = sys.argv[1], sys.argv[2]
started = time.perf_counter()
remaining = replay_all(name, connection_settings=url)
print(json.dumps({"seconds": time.perf_counter() - started, "remaining": remaining}))
"""


def old_python() -> Path:
    """The interpreter of a virtualenv holding domain-event-broker 3.0.2."""
    python = OLD_VENV / "bin" / "python"
    marker = OLD_VENV / f".installed-{OLD_VERSION}"
    if not marker.exists():
        print(f"Installing domain-event-broker=={OLD_VERSION} into {OLD_VENV} ...", flush=True)
        venv.create(OLD_VENV, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"domain-event-broker=={OLD_VERSION}"],
            check=True,
        )
        marker.touch()
    return python


def declare_handler(channel: pika.adapters.blocking_connection.BlockingChannel, name: str) -> None:
    """The topology 3.0.2's ``register(..., dead_letter=True)`` declares."""
    key = f"{name}.*"
    channel.exchange_declare(f"{name}-dlx", exchange_type="topic")
    channel.queue_declare(f"{name}-dl", durable=True)
    channel.queue_bind(f"{name}-dl", f"{name}-dlx", key)
    channel.queue_declare(name, durable=True, arguments={"x-dead-letter-exchange": f"{name}-dlx"})
    channel.exchange_declare(f"{name}-retry", exchange_type="topic")
    channel.queue_bind(name, f"{name}-retry", key)


def fill(channel: pika.adapters.blocking_connection.BlockingChannel, name: str, count: int) -> None:
    """Put ``count`` dead letters, as the 4.0 subscriber writes them, in ``name-dl``."""
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
                    "x-exception-type": "bench.Failure",
                    "x-exception-message": "benchmark",
                    "x-failed-at": int(time.time()),
                    "x-retry-count": 1,
                },
            ),
        )


def wait_count(
    channel: pika.adapters.blocking_connection.BlockingChannel, queue: str, count: int
) -> None:
    deadline = time.monotonic() + 60
    while (found := channel.queue_declare(queue, passive=True).method.message_count) != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{queue} holds {found} messages, not {count}")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument(
        "--url",
        default=os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F"),
    )
    args = parser.parse_args()
    python = old_python()
    suffix = uuid.uuid4().hex[:8]
    new_name, old_name = f"bench-replay-new-{suffix}", f"bench-replay-old-{suffix}"
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        for name in (new_name, old_name):
            declare_handler(channel, name)
            fill(channel, name, args.count)
            wait_count(channel, f"{name}-dl", args.count)

        started = time.perf_counter()
        remaining = replay_all(new_name, connection_settings=args.url)
        new_seconds = time.perf_counter() - started
        assert remaining == 0, remaining

        result = subprocess.run(
            [str(python), "-c", OLD_REPLAY, old_name, args.url],
            capture_output=True,
            text=True,
            check=True,
            cwd=OLD_VENV,  # away from this source tree, so 3.0.2 is imported
        )
        old = json.loads(result.stdout)
        old_seconds = float(old["seconds"])

        wait_count(channel, new_name, args.count)
        wait_count(channel, f"{new_name}-dl", 0)
        # 3.0.2 is not exact (a connection per event, never closed): report
        # what it did rather than insist.
        time.sleep(1)
        old_moved = channel.queue_declare(old_name, passive=True).method.message_count
        old_left = channel.queue_declare(f"{old_name}-dl", passive=True).method.message_count
    finally:
        for name in (new_name, old_name):
            channel.queue_delete(name)
            channel.queue_delete(f"{name}-dl")
            channel.exchange_delete(f"{name}-retry")
            channel.exchange_delete(f"{name}-dlx")
        connection.close()

    ratio = old_seconds / new_seconds
    if old_left or old_moved != args.count:
        print(f"note: 3.0.2 moved {old_moved} and left {old_left} dead letter(s)")
    print(f"replay_all of {args.count} dead letters")
    for label, seconds in (("4.0", new_seconds), (OLD_VERSION, old_seconds)):
        rate = args.count / seconds
        print(f"  domain-event-broker {label:<5}: {seconds:8.3f} s  ({rate:6.0f} events/s)")
    print(f"  speed-up                 : {ratio:8.1f} x  (target >= {TARGET_SPEEDUP:g} x)")
    return 0 if ratio >= TARGET_SPEEDUP else 1


if __name__ == "__main__":
    sys.exit(main())
