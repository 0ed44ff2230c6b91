"""A node of a three-node cluster stops, or dies (kill -9), mid-stream.

Events are published (the publisher given every node's URL), consumed and
one in ten retried, while the node leading the handler's queues goes away
for a few seconds. Every confirmed event is counted: lost (confirmed, never
handled) must be 0 for quorum handlers; duplicates are allowed (at least
once) and reported. Classic handlers are measured for comparison only: their
queue lives on one node, so it is unavailable while that node is down.

On RabbitMQ 3.10 the quorum scenarios are skipped: the broker strands some
retries (see :data:`QUORUM_STRANDS_RETRIES` and docs/cluster.rst, "Measured").
``DEB_TEST_CLUSTER_QUORUM_ON_310=1`` runs them there anyway, to measure again.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pika
import pytest

from domain_event_broker import BrokerError, DomainEvent, Publisher, Subscriber

from .conftest import FIGURES, VERSION, Cluster, Recorder, Worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EVENTS = 1500
#: Seconds between two publishes: the stream lasts about as long as the outage.
PACE = 0.006
#: Seconds the leader stays away.
OUTAGE = 8.0


class Stream:
    """Publishes EVENTS events in a thread, retrying each until confirmed."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.confirmed: set[str] = set()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="cluster-publisher", daemon=True)

    def _run(self) -> None:
        publisher = Publisher(self.urls)
        try:
            for n in range(EVENTS):
                event = DomainEvent("cluster.event", {"n": str(n)})
                while True:
                    try:
                        publisher.publish_event(event)
                    except BrokerError:
                        self.errors += 1
                        time.sleep(0.2)
                        continue
                    self.confirmed.add(str(n))
                    break
                time.sleep(PACE)
        finally:
            publisher.close()


def _left(cluster: Cluster, name: str) -> dict[str, int]:
    """Messages left in the handler's queues (ready and unacknowledged)."""
    for node in cluster.nodes:
        if node.answers():
            return {q: n for q, n in node.queue_messages(name).items() if n}
    return {}


def _delete_handler(cluster: Cluster, name: str) -> None:
    """Delete the handler's queues and exchanges: every scenario binds
    ``cluster.#``, so a queue left behind would take the next scenario's
    events too (and hold more messages than that scenario published)."""
    node = next(node for node in cluster.nodes if node.answers())
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = connection.channel()
        for queue in node.queue_messages(name):
            channel.queue_delete(queue)
        for suffix in ("retry", "dlx", "retry-durable", "dlx-durable"):
            channel.exchange_delete(f"{name}-{suffix}")
    finally:
        connection.close()


def _scenario(cluster: Cluster, queue_type: str, fault: str) -> tuple[int, int, int]:
    """Run one outage; return (confirmed, lost, duplicates)."""
    name = f"cluster-{queue_type}-{fault}-{uuid.uuid4().hex[:6]}"
    with Subscriber(cluster.urls) as setup:
        setup.register(Recorder(), name, ["cluster.#"], dead_letter=True, queue_type=queue_type)
    victim = cluster.leader_of(name)
    # The victim first: publisher and subscriber both start connected to it.
    urls = [victim.url] + [node.url for node in cluster.nodes if node is not victim]
    recorder = Recorder(retry_every=10, delay=1.0)
    subscriber = Subscriber(urls)
    subscriber.register(
        recorder, name, ["cluster.#"], dead_letter=True, max_retries=3, queue_type=queue_type
    )
    worker = Worker(subscriber).start()
    stream = Stream(urls)
    stream.thread.start()
    try:
        wait_until(lambda: len(stream.confirmed) > EVENTS // 5, 60, "the stream to start")
        if fault == "kill":
            victim.kill()
        else:
            victim.stop()
        time.sleep(OUTAGE)
        victim.start()
        stream.thread.join(300)
        assert not stream.thread.is_alive(), "the publisher did not finish"
        confirmed = len(stream.confirmed)
        deadline = 120 if queue_type == "quorum" else 30
        failure: AssertionError | None = None
        try:
            wait_until(
                lambda: set(recorder.handled) >= stream.confirmed,
                deadline,
                "every confirmed event to be handled",
            )
        except AssertionError as exc:
            failure = exc
    finally:
        try:
            worker.stop()
        finally:
            left = _left(cluster, name)
            _delete_handler(cluster, name)
    with recorder.lock:
        lost = len(stream.confirmed - set(recorder.handled))
        duplicates = sum(count - 1 for count in recorder.handled.values())
        twice = sum(1 for count in recorder.handled.values() if count > 1)
        most = max(recorder.handled.values(), default=0)
    FIGURES.append(
        f"RabbitMQ {VERSION} {queue_type:7} {fault:4}: {EVENTS} events, {confirmed} confirmed, "
        f"{stream.errors} publish errors retried, {len(recorder.retried)} retried, "
        f"lost {lost}, duplicates {duplicates} ({twice} events handled more than once, "
        f"at most {most} times); left in queues: {left or 'none'}"
    )
    if failure is not None and queue_type == "quorum":
        raise failure
    return confirmed, lost, duplicates


#: RabbitMQ 3.10.8 (the machine's) strands some retries of a quorum handler
#: when the node leading its queues goes: the delay queue's at-least-once
#: dead-letter worker forwards expired retries to the handler's queue, whose
#: leader is moving too; for some of them no confirmation ever comes back, and
#: the worker leaves resending to a quorum queue to its Ra client, which no
#: longer holds them. They stay in the delay queue, dead-lettered but
#: unsettled ("discard checked out"), until that queue's leader changes again,
#: then arrive. Measured (docs/cluster.rst, "Measured"): 7 runs of 15 stranded
#: 5 to 13 of the 150 retries; in one, 9 were still there after 295 s, and all
#: arrived once the delay queue's leader was moved. The library's queues and
#: arguments are right (4.0.5 lost nothing), so the test is skipped on 3.10
#: instead of being an expected failure that cannot fail.
QUORUM_STRANDS_RETRIES = pytest.mark.skipif(
    VERSION == "3.10" and not os.environ.get("DEB_TEST_CLUSTER_QUORUM_ON_310"),
    reason=(
        "RabbitMQ 3.10.8 strands retries of quorum delay queues through a leader change "
        "(a broker bug, measured in docs/cluster.rst); DEB_TEST_CLUSTER_VERSION=4.0 runs it"
    ),
)


@QUORUM_STRANDS_RETRIES
@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_quorum_handler_loses_nothing_when_the_leader_goes(cluster: Cluster, fault: str) -> None:
    confirmed, lost, _ = _scenario(cluster, "quorum", fault)
    assert confirmed == EVENTS, "the publisher gave up on events"
    assert lost == 0


def test_classic_handler_is_measured_for_comparison(cluster: Cluster) -> None:
    confirmed, _, _ = _scenario(cluster, "classic", "stop")
    assert confirmed == EVENTS, "the publisher gave up on events"
