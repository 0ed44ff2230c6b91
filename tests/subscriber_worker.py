"""A worker script run in a child process by the subscriber tests.

Usage: python -m tests.subscriber_worker NAME BINDING_KEY STATE_DIR [SLEEP]

The handler writes ``STATE_DIR/started-<uuid>`` when it starts, sleeps SLEEP
seconds, then writes ``STATE_DIR/finished-<uuid>`` (and ``-redelivered``
when the broker flagged the event as a redelivery). The script exits with
start_consuming()'s outcome: 0 when it returned normally.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from domain_event_broker import DomainEvent, Subscriber


def main() -> int:
    name, binding_key, state_dir = sys.argv[1:4]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    state = Path(state_dir)

    def handler(event: DomainEvent) -> None:
        suffix = "-redelivered" if event.redelivered else ""
        (state / f"started-{event.uuid_string}{suffix}").touch()
        time.sleep(pause)
        (state / f"finished-{event.uuid_string}{suffix}").touch()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    subscriber = Subscriber()
    subscriber.register(handler, name, [binding_key])
    (state / "ready").touch()
    subscriber.start_consuming()
    (state / "returned").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
