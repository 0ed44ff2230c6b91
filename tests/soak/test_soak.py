"""A publisher and a subscriber for ten minutes, every connection killed every 30 s.

Run with ``make soak``. Shorter runs: ``DEB_SOAK_SECONDS=60``; another kill
interval: ``DEB_SOAK_KILL_INTERVAL``. Passes when every confirmed event was
consumed (lost = 0) and resident memory grew by less than 20 MB from the
end of the first interval (warm-up) to the end.
"""

from __future__ import annotations

import collections
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


class Consumed:
    """A handler counting the uuids it saw (nothing else is kept)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.counts[event.uuid_string] += 1

    def seen(self) -> set[str]:
        with self.lock:
            return set(self.counts)


def test_soak(rabbitmq: RabbitControl, names: Any) -> None:
    library_logger = logging.getLogger("domain_event_broker")
    counter = LevelCounter()
    library_logger.addHandler(counter)
    previous_level = library_logger.level
    library_logger.setLevel(logging.INFO)

    name = names.new("soak")
    routing_key = f"soak.{uuid.uuid4().hex[:8]}"
    consumed = Consumed()
    subscriber = Subscriber(BROKER_URL, timeout=30)
    subscriber.register(consumed, name, [routing_key])
    subscriber_error: list[BaseException] = []

    def consume() -> None:
        try:
            subscriber.start_consuming()
        except BaseException as exc:
            subscriber_error.append(exc)

    confirmed: list[str] = []
    failed: list[str] = []
    stop_publishing = threading.Event()

    def publish() -> None:
        with Publisher(BROKER_URL, timeout=30) as publisher:
            while not stop_publishing.is_set():
                event = DomainEvent(routing_key, {"at": time.time()})
                try:
                    publisher.publish_event(event)
                except BrokerError:
                    failed.append(event.uuid_string)
                else:
                    confirmed.append(event.uuid_string)
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
        while time.monotonic() - started + KILL_INTERVAL <= DURATION:
            time.sleep(KILL_INTERVAL)
            samples.append((time.monotonic() - started, rss_mb()))
            rabbitmq.close_all_connections()
            kills += 1
            assert consumer.is_alive(), subscriber_error
        stop_publishing.set()
        producer.join(60)
        assert not producer.is_alive()
        wanted = set(confirmed)
        wait_for(lambda: wanted <= consumed.seen(), timeout=120, message="all confirmed events")
    finally:
        stop_publishing.set()
        subscriber.stop_consuming()
        consumer.join(60)
        library_logger.removeHandler(counter)
        library_logger.setLevel(previous_level)

    rss_end = rss_mb()
    rss_base = samples[0][1] if samples else rss_start
    lost = len(set(confirmed) - consumed.seen())
    duplicates = sum(n - 1 for n in consumed.counts.values() if n > 1)
    line = (
        f"soak: {time.monotonic() - started:.0f}s, {kills} kills every {KILL_INTERVAL:g}s, "
        f"{len(confirmed)} events confirmed, {len(failed)} publish calls raised, "
        f"{consumed.counts.total()} deliveries, lost={lost}, duplicates={duplicates}, "
        f"RSS start={rss_start:.1f} MB, after warm-up={rss_base:.1f} MB, end={rss_end:.1f} MB "
        f"(growth {rss_end - rss_base:+.1f} MB), log records {dict(sorted(counter.counts.items()))}"
    )
    print(line)
    print("RSS samples (s, MB):", [(round(t), round(m, 1)) for t, m in samples])
    REPORTS.append(line)
    assert not subscriber_error, subscriber_error
    assert lost == 0
    assert rss_end - rss_base < MAX_RSS_GROWTH_MB
