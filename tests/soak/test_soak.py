"""A publisher and a subscriber for ten minutes, every connection killed every 30 s.

Run with ``make soak``. Shorter runs: ``DEB_SOAK_SECONDS=60``; another kill
interval: ``DEB_SOAK_KILL_INTERVAL``. Passes when every confirmed event was
consumed (lost = 0) and resident memory grew by less than 20 MB from the
end of the first interval (warm-up) to the end.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Any

import pytest

from domain_event_broker import BrokerError, DomainEvent, Publisher, Subscriber

from ..faults.control import REPORTS, RabbitControl
from ..helpers import BROKER_URL, wait_for

DURATION = float(os.environ.get("DEB_SOAK_SECONDS", "600"))
KILL_INTERVAL = float(os.environ.get("DEB_SOAK_KILL_INTERVAL", "30"))
#: Pause between two publish calls (about 50 events per second).
PACE = 0.02
MAX_RSS_GROWTH_MB = 20.0

# Bounded: the run itself plus time to drain and clean up.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(DURATION + 300)]


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class LevelCounter(logging.Handler):
    """Counts the library's log records by level (keeps no records)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.name.rsplit('.', 1)[-1]}:{record.levelname}"] += 1


class Tally:
    """Counts per event number in preallocated arrays, so the bookkeeping
    itself does not grow the resident memory being measured."""

    def __init__(self, size: int) -> None:
        self.lock = threading.Lock()
        self.confirmed = bytearray(size)
        self.delivered = bytearray(size)
        self.published = 0
        self.failed = 0

    def __call__(self, event: DomainEvent) -> None:  # the handler
        n = event.data["n"]
        with self.lock:
            self.delivered[n] = min(self.delivered[n] + 1, 255)

    def lost(self) -> int:
        with self.lock:
            return sum(
                1 for n in range(self.published) if self.confirmed[n] and not self.delivered[n]
            )

    def duplicates(self) -> int:
        with self.lock:
            return sum(max(0, self.delivered[n] - 1) for n in range(self.published))

    def deliveries(self) -> int:
        with self.lock:
            return sum(self.delivered[: self.published])


def test_soak(rabbitmq: RabbitControl, names: Any) -> None:
    library_logger = logging.getLogger("domain_event_broker")
    counter = LevelCounter()
    library_logger.addHandler(counter)
    previous_level = library_logger.level
    library_logger.setLevel(logging.INFO)

    name = names.new("soak")
    routing_key = f"soak.{uuid.uuid4().hex[:8]}"
    tally = Tally(int(DURATION / PACE) + 1000)
    subscriber = Subscriber(BROKER_URL, timeout=30)
    subscriber.register(tally, name, [routing_key])
    subscriber_error: list[BaseException] = []

    def consume() -> None:
        try:
            subscriber.start_consuming()
        except BaseException as exc:
            subscriber_error.append(exc)

    stop_publishing = threading.Event()

    def publish() -> None:
        with Publisher(BROKER_URL, timeout=30) as publisher:
            n = 0
            while not stop_publishing.is_set() and n < len(tally.confirmed):
                try:
                    publisher.publish_event(DomainEvent(routing_key, {"n": n}))
                except BrokerError:
                    tally.failed += 1
                else:
                    tally.confirmed[n] = 1
                n += 1
                tally.published = n
                time.sleep(PACE)

    rss_start = rss_mb()
    consumer = threading.Thread(target=consume, name="soak-subscriber", daemon=True)
    producer = threading.Thread(target=publish, name="soak-publisher", daemon=True)
    consumer.start()
    producer.start()
    started = time.monotonic()
    samples: list[tuple[float, float]] = []
    kills = 0
    try:
        # Kill on a fixed schedule: every KILL_INTERVAL seconds from the start.
        while (kills + 1) * KILL_INTERVAL <= DURATION:
            time.sleep(max(0.0, started + (kills + 1) * KILL_INTERVAL - time.monotonic()))
            samples.append((time.monotonic() - started, rss_mb()))
            rabbitmq.close_all_connections()
            kills += 1
            assert consumer.is_alive(), subscriber_error
        time.sleep(max(0.0, started + DURATION - time.monotonic()))
        stop_publishing.set()
        producer.join(60)
        assert not producer.is_alive()
        ran = time.monotonic() - started
        with contextlib.suppress(AssertionError):  # what is missing is counted below
            wait_for(lambda: tally.lost() == 0, timeout=120, interval=0.5)
    finally:
        stop_publishing.set()
        subscriber.stop_consuming()
        consumer.join(60)
        library_logger.removeHandler(counter)
        library_logger.setLevel(previous_level)

    rss_end = rss_mb()
    rss_base = samples[0][1] if samples else rss_start
    lost = tally.lost()
    line = (
        f"soak: {ran:.0f}s, {kills} kills every {KILL_INTERVAL:g}s, {tally.published} publish "
        f"calls, {sum(tally.confirmed)} confirmed, {tally.failed} raised, "
        f"{tally.deliveries()} deliveries, lost={lost}, duplicates={tally.duplicates()}, "
        f"RSS start={rss_start:.1f} MB, after the first interval={rss_base:.1f} MB, "
        f"end={rss_end:.1f} MB (growth {rss_end - rss_base:+.1f} MB), "
        f"log records {dict(sorted(counter.counts.items()))}"
    )
    print(line)
    print("RSS samples (s, MB):", [(round(t), round(m, 1)) for t, m in samples])
    REPORTS.append(line)
    assert not subscriber_error, subscriber_error
    assert lost == 0
    assert rss_end - rss_base < MAX_RSS_GROWTH_MB
