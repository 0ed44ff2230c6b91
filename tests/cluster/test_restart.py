"""A broker restart loses no retry and no dead letter (on a private node)."""

from __future__ import annotations

import uuid

import pytest

from domain_event_broker import DomainEvent, Publisher, Subscriber, replay_all

from .conftest import Node, Recorder, Worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EVENTS = 20
DELAY = 2.0


def _publish(node: Node, count: int, routing_key: str = "restart.event") -> None:
    with Publisher(node.url) as publisher:
        for n in range(count):
            publisher.publish_event(DomainEvent(routing_key, {"n": str(n)}))


def _subscriber(node: Node, name: str, recorder: Recorder, queue_type: str | None) -> Subscriber:
    subscriber = Subscriber(node.url)
    subscriber.register(
        recorder,
        name,
        ["restart.#"],
        dead_letter=True,
        max_retries=3,
        queue_type=queue_type,
    )
    return subscriber


@pytest.mark.parametrize("queue_type", [None, "quorum"])
def test_retries_waiting_in_delay_queues_survive_a_restart_without_workers(
    restart_node: Node, queue_type: str | None
) -> None:
    name = f"restart-{uuid.uuid4().hex[:8]}"
    recorder = Recorder(retry_every=1, delay=DELAY)
    worker = Worker(_subscriber(restart_node, name, recorder, queue_type)).start()
    _publish(restart_node, EVENTS)
    wait_until(lambda: len(recorder.retried) == EVENTS, 30, "every event asked for a retry")
    worker.stop()
    assert recorder.handled_count() == 0

    restart_node.restart()
    # With no worker running, every delay expires and dead-letters.
    wait_until(
        lambda: sum(restart_node.queue_messages(f"{name}-delay-").values()) == 0,
        60,
        "the delay queues to empty",
    )

    recorder_after = Recorder()
    worker = Worker(_subscriber(restart_node, name, recorder_after, queue_type)).start()
    try:
        wait_until(
            lambda: recorder_after.handled_count() == EVENTS,
            30,
            f"all {EVENTS} retried events to arrive (got {recorder_after.handled_count()})",
        )
    finally:
        worker.stop()


@pytest.mark.parametrize("queue_type", [None, "quorum"])
def test_retries_survive_a_restart_with_workers_running(
    restart_node: Node, queue_type: str | None
) -> None:
    name = f"restart-{uuid.uuid4().hex[:8]}"
    recorder = Recorder(retry_every=1, delay=DELAY)
    worker = Worker(_subscriber(restart_node, name, recorder, queue_type)).start()
    try:
        _publish(restart_node, EVENTS)
        wait_until(lambda: len(recorder.retried) == EVENTS, 30, "every event asked for a retry")
        restart_node.restart()
        wait_until(
            lambda: recorder.handled_count() == EVENTS,
            90,
            f"all {EVENTS} retried events to arrive (got {recorder.handled_count()})",
        )
    finally:
        worker.stop()


@pytest.mark.parametrize("queue_type", [None, "quorum"])
def test_dead_letters_survive_a_restart_and_replay(
    restart_node: Node, queue_type: str | None
) -> None:
    name = f"restart-{uuid.uuid4().hex[:8]}"

    def fail(event: object) -> None:
        raise RuntimeError("always")

    subscriber = Subscriber(restart_node.url)
    subscriber.register(fail, name, ["restart.#"], dead_letter=True, queue_type=queue_type)
    worker = Worker(subscriber).start()
    try:
        _publish(restart_node, EVENTS)
        wait_until(
            lambda: restart_node.queue_messages(f"{name}-dl").get(f"{name}-dl") == EVENTS,
            30,
            "every event to be dead-lettered",
        )
    finally:
        worker.stop()

    restart_node.restart()
    # A quorum queue reports its messages once its leader is back.
    wait_until(
        lambda: restart_node.queue_messages(f"{name}-dl").get(f"{name}-dl") == EVENTS,
        30,
        f"the {EVENTS} dead letters in {name}-dl after the restart",
    )

    recorder = Recorder()
    subscriber = _subscriber(restart_node, name, recorder, queue_type)
    assert replay_all(name, connection_settings=restart_node.url) == 0  # none left
    worker = Worker(subscriber).start()
    try:
        wait_until(lambda: recorder.handled_count() == EVENTS, 30, "every replayed event")
    finally:
        worker.stop()
