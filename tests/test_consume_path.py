"""How deliveries travel from the socket to the handler thread and back.

Each delivery reaches the consumer as it is read (not through pika's event
queue); a read's deliveries go to the handler thread together; the I/O
thread waits a moment for quick handlers' outcomes instead of taking the GIL
from them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika.adapters.blocking_connection import BlockingChannel

import domain_event_broker._subscribing.consume_loop as consumer_module
from domain_event_broker import DomainEvent, Publisher, Subscriber
from domain_event_broker._subscribing.dispatch import Action, Delivery, Outcome
from domain_event_broker._subscribing.handler_threads import (
    HandlerThreads,
    Intake,
    Mailbox,
    ThreadDied,
)
from domain_event_broker._subscribing.registration import Registration

from .conftest import Names
from .helpers import BROKER_URL, consumer_count, queue_size, wait_for
from .test_subscriber import consume_until


def fill(key: str, count: int) -> None:
    with Publisher(BROKER_URL) as publisher:
        publisher.publish_many([DomainEvent(key, {"n": n}) for n in range(count)])


@pytest.mark.fast_paths
def test_deliveries_reach_the_consumer_as_read(names: Names, monkeypatch: Any) -> None:
    """No delivery goes through pika's queue of events to dispatch (once
    consuming: the read that brings the broker's consume-ok still does)."""
    queued: list[object] = []
    original = BlockingChannel._on_consumer_message_delivery

    def counting(self: BlockingChannel, *args: Any) -> None:
        queued.append(args)
        original(self, *args)

    monkeypatch.setattr(BlockingChannel, "_on_consumer_message_delivery", counting)
    name = names.new("asread")
    handled: list[int] = []
    subscriber = Subscriber(BROKER_URL)
    subscriber.register(lambda event: handled.append(event.data["n"]), name, [f"{name}.k"])

    filled: list[bool] = []

    def fill_once_consuming() -> bool:
        if not filled:
            if consumer_count(name) == 0:
                return False
            fill(f"{name}.k", 30)
            filled.append(True)
        return len(handled) == 30

    consume_until(subscriber, fill_once_consuming)
    assert handled == list(range(30))  # in order, each once
    assert queued == []
    wait_for(lambda: queue_size(name) == 0)


def test_a_reads_deliveries_reach_the_handler_thread_together(
    names: Names, monkeypatch: Any
) -> None:
    submitted: list[int] = []
    original = HandlerThreads.submit

    def counting(self: HandlerThreads, deliveries: list[Delivery]) -> None:
        submitted.append(len(deliveries))
        original(self, deliveries)

    monkeypatch.setattr(HandlerThreads, "submit", counting)
    name = names.new("batch")
    handled: list[int] = []
    subscriber = Subscriber(BROKER_URL, prefetch_count=200)
    subscriber.register(lambda event: handled.append(event.data["n"]), name, [f"{name}.k"])
    fill(f"{name}.k", 200)  # waiting in the queue: the broker sends them at once
    consume_until(subscriber, lambda: len(handled) == 200)
    assert handled == list(range(200))
    assert sum(submitted) == 200
    assert len(submitted) <= 100, submitted  # one per delivery without the batching


def test_events_arriving_while_stopping_are_returned_to_the_queue(names: Names) -> None:
    """Stopping from a handler: what was delivered and not handled is requeued."""
    name = names.new("stopping")
    handled: list[int] = []
    subscriber = Subscriber(BROKER_URL, prefetch_count=50)

    def handler(event: DomainEvent) -> None:
        handled.append(event.data["n"])
        if len(handled) == 5:
            subscriber.stop_consuming()

    subscriber.register(handler, name, [f"{name}.k"])
    fill(f"{name}.k", 100)
    subscriber.start_consuming(timeout=30)
    assert handled == [0, 1, 2, 3, 4]
    wait_for(lambda: queue_size(name) == 95)  # nothing lost, nothing unacknowledged


# -- the Mailbox ------------------------------------------------------------------


def outcome() -> Outcome:
    registration = Registration(lambda event: None, "q", ("k",))
    return Outcome(Delivery(registration, 1, "k", b"{}"), Action.ACK)


def post_later(mailbox: Mailbox, items: list[Outcome | ThreadDied], pause: float) -> None:
    def run() -> None:
        for item in items:
            time.sleep(pause)
            mailbox.post(item)

    threading.Thread(target=run, daemon=True).start()


def test_waiting_for_outcomes_ends_when_all_are_posted() -> None:
    wakes: list[None] = []
    mailbox = Mailbox(lambda: wakes.append(None))
    mailbox.expect(3)
    post_later(mailbox, [outcome(), outcome(), outcome()], 0.02)
    started = time.monotonic()
    mailbox.wait_for_outcomes(60.0)
    assert time.monotonic() - started < 60.0  # ended by the outcomes, not the timeout
    assert len(mailbox.take()) == 3
    assert wakes == []  # it was waiting: no need to wake its loop


def test_waiting_for_outcomes_ends_at_the_timeout() -> None:
    mailbox = Mailbox(lambda: None)
    mailbox.expect(2)
    mailbox.post(outcome())
    started = time.monotonic()
    mailbox.wait_for_outcomes(0.2)
    assert 0.15 < time.monotonic() - started < 60.0  # the upper bound only catches a hang
    assert len(mailbox.take()) == 1


def test_a_thread_death_ends_the_wait_at_once() -> None:
    mailbox = Mailbox(lambda: None)
    mailbox.expect(2)
    post_later(mailbox, [ThreadDied("t", RuntimeError("boom"))], 0.02)
    started = time.monotonic()
    mailbox.wait_for_outcomes(60.0)
    assert time.monotonic() - started < 60.0  # ended by the death, not the timeout
    assert isinstance(mailbox.take()[0], ThreadDied)


def test_outside_a_wait_the_first_outcome_wakes_the_loop_once() -> None:
    wakes: list[None] = []
    mailbox = Mailbox(lambda: wakes.append(None))
    mailbox.expect(3)
    mailbox.post(outcome())
    mailbox.post(outcome())
    assert len(wakes) == 1
    assert len(mailbox.take()) == 2
    mailbox.post(outcome())
    assert len(wakes) == 2
    mailbox.wait_for_outcomes(10.0)  # all posted: returns at once


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["expect", "post", "take", "wait"]), max_size=40))
def test_the_mailbox_loses_nothing_and_wakes_once_per_take(operations: list[str]) -> None:
    wakes: list[None] = []
    mailbox = Mailbox(lambda: wakes.append(None))
    posted: list[Outcome] = []
    taken: list[Outcome | ThreadDied] = []
    expected_wakes = 0
    waiting_items = 0  # posted since the last take
    for operation in operations:
        if operation == "expect":
            mailbox.expect(1)
        elif operation == "post":
            item = outcome()
            if waiting_items == 0:
                expected_wakes += 1
            waiting_items += 1
            mailbox.post(item)
            posted.append(item)
        elif operation == "take":
            taken.extend(mailbox.take())
            waiting_items = 0
        else:
            mailbox.wait_for_outcomes(0.0)  # never blocks the test
        assert len(wakes) == expected_wakes
    taken.extend(mailbox.take())
    assert taken == posted  # every outcome, once, in order


# -- handing over -----------------------------------------------------------------


class RecordingPool:
    """Stands in for a pool of handler threads: records what it is given."""

    def __init__(self) -> None:
        self.batches: list[list[Delivery]] = []

    def submit(self, deliveries: list[Delivery]) -> None:
        self.batches.append(deliveries)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3), max_size=60))
def test_each_pool_gets_its_deliveries_in_the_order_they_came(pools_of: list[int]) -> None:
    pools = [RecordingPool() for _ in range(4)]
    registration = Registration(lambda event: None, "q", ("k",))
    mailbox = Mailbox(lambda: None)
    intake = Intake(mailbox)
    for tag, index in enumerate(pools_of):
        intake.add(pools[index], Delivery(registration, tag, "k", b"{}"))  # type: ignore[arg-type]
    assert intake.hand_over() == len(pools_of)
    groups = [(pool, batch) for pool in pools for batch in pool.batches]
    assert len(groups) == len(set(pools_of))
    assert len({id(pool) for pool, _ in groups}) == len(groups)  # one batch per pool
    for pool, deliveries in groups:
        expected = [tag for tag, index in enumerate(pools_of) if pools[index] is pool]
        assert [delivery.delivery_tag for delivery in deliveries] == expected
    assert mailbox._pending == len(pools_of)  # their outcomes are expected
    assert intake.hand_over() == 0  # nothing twice


def test_the_handler_threads_of_a_pool_share_a_batch(names: Names) -> None:
    """With concurrency, a read's deliveries are shared out, not run by one thread."""
    name = names.new("share")
    seen: set[str] = set()
    lock = threading.Lock()
    handled: list[int] = []
    # Each call waits until four are running at once: only four threads
    # sharing the deliveries get past it, however the machine schedules them.
    together = threading.Barrier(4, timeout=20)
    broken: list[BaseException] = []

    def handler(event: DomainEvent) -> None:
        try:
            together.wait()
        except threading.BrokenBarrierError as exc:
            broken.append(exc)
        with lock:
            seen.add(threading.current_thread().name)
            handled.append(event.data["n"])

    subscriber = Subscriber(BROKER_URL)
    subscriber.register(handler, name, [f"{name}.k"], concurrency=4)
    fill(f"{name}.k", 16)
    consume_until(subscriber, lambda: len(handled) == 16, timeout=60)
    assert broken == [], "fewer than four handler calls ran at once"
    assert len(seen) == 4


def test_a_failure_while_noting_a_delivery_stops_the_subscriber_loudly(
    names: Names, monkeypatch: Any
) -> None:
    """The consumer runs inside pika's reading: if it raises (a bug), the
    error ends start_consuming() and the event stays in the queue."""

    def broken(*args: Any, **kwargs: Any) -> Delivery:
        raise RuntimeError("cannot note this delivery")

    name = names.new("noting")
    subscriber = Subscriber(BROKER_URL)
    handled: list[DomainEvent] = []
    subscriber.register(handled.append, name, [f"{name}.k"])
    fill(f"{name}.k", 3)
    monkeypatch.setattr(consumer_module, "Delivery", broken)
    with pytest.raises(RuntimeError, match="cannot note"):
        subscriber.start_consuming(timeout=30)
    assert handled == []
    wait_for(lambda: queue_size(name) == 3)  # redelivered, nothing lost
