"""Failover between two real nodes: the first is stopped, the second takes over.

Needs a second, standalone broker (not clustered with the first):
``DEB_TEST_SECOND_BROKER`` (its URL) and ``DEB_TEST_SECOND_RABBITMQ_NODE``
(its node name). Skipped without them, e.g. in CI with one broker; the
failover logic itself is also covered there by the proxy-based tests.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pika
import pytest

from domain_event_broker import DomainEvent, Publisher, Subscriber

from ..helpers import BROKER_URL, rabbitmqctl_command, wait_for
from .control import RabbitControl, Recorder, unique

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

SECOND_URL = os.environ.get("DEB_TEST_SECOND_BROKER", "")
SECOND_NODE = os.environ.get("DEB_TEST_SECOND_RABBITMQ_NODE", "")


@pytest.mark.skipif(not (SECOND_URL and SECOND_NODE), reason="no second broker configured")
def test_failover_to_a_second_node(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    second = RabbitControl(SECOND_NODE, SECOND_URL, rabbitmqctl_command(with_node=False))
    urls = [BROKER_URL, SECOND_URL]
    name = names.new("faults-failover")
    routing_key = unique()
    recorder = Recorder()
    subscriber = Subscriber(urls, timeout=10)
    subscriber.register(recorder, name, [routing_key])
    runner = run_subscriber(subscriber)
    try:
        with Publisher(urls, timeout=30) as publisher:
            first = publisher.publish_event(DomainEvent(routing_key, {"n": 1}))
            wait_for(lambda: first.uuid_string in recorder.uuids(), message="the first event")

            rabbitmq.stop_app()  # the first node is gone

            # The subscriber declares its topology on the second node and
            # consumes there; the publisher fails over to it as well.
            def consuming_on_second() -> bool:
                return name in second.ctl("list_consumers", "queue_name", "--no-table-headers")

            wait_for(consuming_on_second, timeout=60, interval=0.5, message="the second node")
            later = publisher.publish_event(DomainEvent(routing_key, {"n": 2}))
            wait_for(lambda: later.uuid_string in recorder.uuids(), message="the second event")
        runner.assert_running()
        messages = [r.getMessage() for r in caplog.records if r.name.endswith(".subscribe")]
        assert sum("Lost the connection" in m for m in messages) == 1, messages
        assert sum("Reconnected" in m for m in messages) == 1, messages
        runner.stop()
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(SECOND_URL))
        channel = connection.channel()
        channel.queue_delete(name)
        channel.exchange_delete(f"{name}-retry")
        connection.close()
