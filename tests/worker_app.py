"""A user's worker module, run by ``domain-event-broker worker`` in the tests.

``tests.worker_app:make_subscriber`` builds a Subscriber from environment
variables: handler name ``DEB_TEST_WORKER_NAME``, binding key
``DEB_TEST_WORKER_KEY``, state directory ``DEB_TEST_WORKER_STATE``.

The handler writes ``STATE/started-<uuid>`` and ``STATE/handled-<uuid>-<pid>``
around its work. Event data may ask it to ``sleep`` (seconds), to ``crash``
the process once (``os._exit(3)``, leaving ``STATE/crashed``), or to
``publish`` a follow-up event; with ``always`` it crashes every time.

While ``STATE/slow-start`` exists, building the subscriber takes that many
seconds more (a worker process still starting), and writes
``STATE/starting-<pid>`` first.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from domain_event_broker import DomainEvent, Subscriber, publish_domain_event

log = logging.getLogger(__name__)


def make_subscriber() -> Subscriber:
    name = os.environ["DEB_TEST_WORKER_NAME"]
    key = os.environ["DEB_TEST_WORKER_KEY"]
    state = Path(os.environ["DEB_TEST_WORKER_STATE"])
    slow_start = state / "slow-start"
    if slow_start.exists():
        (state / f"starting-{os.getpid()}").touch()
        time.sleep(float(slow_start.read_text() or 0))

    def handler(event: DomainEvent) -> None:
        (state / f"started-{event.uuid_string}").touch()
        data = event.data if isinstance(event.data, dict) else {}
        if data.get("crash") and (data.get("always") or not (state / "crashed").exists()):
            (state / "crashed").touch()
            os._exit(3)
        time.sleep(float(data.get("sleep", 0)))
        if data.get("publish"):
            publish_domain_event(data["publish"], {})
        log.info("handled")
        (state / f"handled-{event.uuid_string}-{os.getpid()}").touch()

    subscriber = Subscriber(prefetch_count=1)
    subscriber.register(handler, name, [key])
    return subscriber


#: Not a Subscriber: the worker command refuses it.
not_a_subscriber = 42
