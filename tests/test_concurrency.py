"""register(..., concurrency=N): several events of one handler at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from domain_event_broker import DomainEvent, Retry, Subscriber, publish_domain_event

from .conftest import Names
from .helpers import get_messages, queue_size, wait_for
from .test_subscriber import ROOT, consume_until


class Overlap:
    """A slow handler that records how many calls ran at the same time.

    With ``together=N``, each call instead waits until N calls run at once
    (a barrier), so that N are seen together however the machine schedules
    the threads; :attr:`broken` records each time they were not.
    """

    def __init__(self, pause: float = 0.0, together: int = 0) -> None:
        self.pause = pause
        self.barrier = threading.Barrier(together, timeout=20) if together else None
        self.broken: list[BaseException] = []
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.done: list[str] = []

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        if self.barrier is not None:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError as exc:
                self.broken.append(exc)
        time.sleep(self.pause)
        with self.lock:
            self.running -= 1
            self.done.append(event.uuid_string)


@pytest.mark.parametrize("concurrency", [0, -1, True, 1.5, "2", 1001])
def test_concurrency_is_validated(names: Names, concurrency: Any) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Subscriber().register(lambda event: None, names.new(), ["#"], concurrency=concurrency)


def test_up_to_n_events_run_at_once(names: Names) -> None:
    name = names.new("conc")
    handler = Overlap(together=4)
    subscriber = Subscriber(prefetch_count=1)  # concurrency still gets N in flight
    subscriber.register(handler, name, [f"{name}.k"], concurrency=4)
    for _ in range(12):
        publish_domain_event(f"{name}.k", {})
    consume_until(subscriber, lambda: len(handler.done) == 12, timeout=60)
    assert handler.broken == [], "fewer than four events ran at once"
    assert handler.most == 4
    assert queue_size(name) == 0


def test_default_concurrency_is_one_at_a_time(names: Names) -> None:
    name = names.new("conc")
    handler = Overlap(0.02)
    subscriber = Subscriber()
    subscriber.register(handler, name, [f"{name}.k"])
    for _ in range(10):
        publish_domain_event(f"{name}.k", {})
    consume_until(subscriber, lambda: len(handler.done) == 10, timeout=30)
    assert handler.most == 1


def test_retries_and_dead_letters_with_concurrency(names: Names) -> None:
    name = names.new("conc")
    key = f"{name}.k"
    lock = threading.Lock()
    attempts: dict[str, int] = {}

    def handler(event: DomainEvent) -> None:
        time.sleep(0.05)
        with lock:
            attempts[event.uuid_string] = attempts.get(event.uuid_string, 0) + 1
        kind = event.data["kind"]
        if kind == "retry" and event.retries < 2:
            raise Retry(0.1)
        if kind == "fail":
            raise KeyError(kind)

    subscriber = Subscriber()
    subscriber.register(handler, name, [key], dead_letter=True, max_retries=3, concurrency=5)
    kinds = ["ok", "retry", "fail"] * 10
    events = [publish_domain_event(key, {"kind": kind}) for kind in kinds]

    def finished() -> bool:
        with lock:
            retried = [attempts.get(e.uuid_string, 0) for e in events if e.data["kind"] == "retry"]
            ok = [attempts.get(e.uuid_string, 0) for e in events if e.data["kind"] == "ok"]
        return (
            all(count >= 3 for count in retried)
            and all(count >= 1 for count in ok)
            and queue_size(f"{name}-dl") == 10
        )

    consume_until(subscriber, finished, timeout=60)
    dead = {properties.message_id for _, properties, _ in get_messages(f"{name}-dl")}
    assert dead == {e.uuid_string for e in events if e.data["kind"] == "fail"}
    assert queue_size(name) == 0


def test_sigterm_waits_for_every_running_handler(names: Names, tmp_path: Path) -> None:
    name = names.new("conc")
    key = f"{name}.k"
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, time, pathlib\n"
        "from domain_event_broker import Subscriber\n"
        "state = pathlib.Path(sys.argv[1])\n"
        "def handler(event):\n"
        "    (state / ('started-' + event.uuid_string)).touch()\n"
        "    time.sleep(1.0)\n"
        "    (state / ('finished-' + event.uuid_string)).touch()\n"
        "s = Subscriber()\n"
        f"s.register(handler, {name!r}, [{key!r}], concurrency=3)\n"
        "(state / 'ready').touch()\n"
        "s.start_consuming()\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), timeout=30)
        events = [publish_domain_event(key, {}) for _ in range(6)]
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 3, timeout=20)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    started = {p.name.removeprefix("started-") for p in tmp_path.glob("started-*")}
    finished = {p.name.removeprefix("finished-") for p in tmp_path.glob("finished-*")}
    assert len(started) == 3
    assert started == finished  # every running handler finished
    # The three not started went back to the queue.
    wait_for(lambda: queue_size(name) == 3)
    assert {e.uuid_string for e in events} >= started
