"""A suspect delivery starts alone (issue 23, item 1): no broker needed.

Before a handler thread starts a delivery a quorum queue got back
``SUSPECT_COUNT`` times or more, every other delivery of its channel that it
holds and that was returned before is given back (a SKIP outcome, then a
barrier the I/O thread releases once they are settled). The broker-side
counts are in ``tests/faults/test_quorum_delivery_limit.py``.
"""

from __future__ import annotations

import threading

import pika
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_event_broker import DomainEvent
from domain_event_broker._subscribing.dispatch import Action, Delivery, Outcome
from domain_event_broker._subscribing.handler_threads import (
    SUSPECT_COUNT,
    Barrier,
    HandlerThreads,
    Mailbox,
    ThreadDied,
)
from domain_event_broker._subscribing.registration import Registration


def _delivery(registration: Registration, tag: int, count: int | None, generation: int) -> Delivery:
    headers = None if count is None else {"x-delivery-count": count}
    body = DomainEvent("k", {"tag": tag}).to_json().encode()
    return Delivery(
        registration,
        tag,
        "k",
        body,
        pika.BasicProperties(headers=headers),
        generation=generation,
    )


class FakeIOThread:
    """Takes what handler threads post, as the I/O thread would: notes which
    deliveries were given back and releases each barrier after them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.given_back: set[int] = set()
        self.outcomes: dict[int, Action] = {}
        self.woken = threading.Event()
        self.mailbox = Mailbox(self.woken.set)

    def run_until(self, expected: int) -> None:
        while True:
            self.woken.wait(0.05)
            self.woken.clear()
            for item in self.mailbox.take():
                assert not isinstance(item, ThreadDied), item.error
                if isinstance(item, Barrier):
                    item.done.set()
                    continue
                assert isinstance(item, Outcome)
                tag = item.delivery.delivery_tag
                assert tag not in self.outcomes, f"two outcomes for {tag}"
                with self.lock:
                    self.outcomes[tag] = item.action
                    if item.action is Action.SKIP:
                        self.given_back.add(tag)
            if len(self.outcomes) == expected:
                return


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, SUSPECT_COUNT + 2)), st.integers(0, 1)),
        min_size=1,
        max_size=30,
    )
)
def test_a_suspect_starts_only_after_the_returned_others_are_given_back(
    batch: list[tuple[int | None, int]],
) -> None:
    io = FakeIOThread()
    started: list[int] = []
    given_back_before: dict[int, set[int]] = {}

    def handler(event: DomainEvent) -> None:
        tag = event.data["tag"]
        started.append(tag)
        with io.lock:
            given_back_before[tag] = set(io.given_back)

    registration = Registration(handler, "q", ("k",))
    pool = HandlerThreads("test-suspects", 1, io.mailbox, lambda delivery: delivery.generation != 0)
    deliveries = [
        _delivery(registration, tag, count, generation)
        for tag, (count, generation) in enumerate(batch)
    ]
    io.mailbox.expect(len(deliveries))
    pool.start()
    try:
        pool.submit(deliveries)
        io.run_until(len(deliveries))
    finally:
        pool.stop(timeout=5)
    # Every delivery has exactly one outcome: handled, or skipped/given back.
    assert set(io.outcomes) == set(range(len(batch)))
    for tag, (_, generation) in enumerate(batch):
        if generation != 0:
            assert io.outcomes[tag] is Action.SKIP  # its channel is gone
    for position, tag in enumerate(started):
        count, _ = batch[tag]
        if count is not None and count >= SUSPECT_COUNT:
            later_returned = {
                other
                for other in range(tag + 1, len(batch))
                if batch[other][1] == 0 and (batch[other][0] or 0) >= 1
            }
            assert later_returned <= given_back_before[tag] | set(started[:position])
    # What is not given back is handled in the order it came.
    assert started == sorted(started)
    # Nothing is given back that was never returned on the live channel.
    for tag in io.given_back:
        count, generation = batch[tag]
        assert generation != 0 or (count or 0) >= 1
