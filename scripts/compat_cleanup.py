"""Delete what 3.0.2's test suite leaves on the broker (`make compat`).

3.0.2's tests use fixed queue names and never delete some of them; one binds
``#`` and would otherwise collect every event published on the broker, run
after run. Run before and after the suite.
"""

from __future__ import annotations

import os

import pika

QUEUES = [
    "test-auto-delete",
    "test-consumer-timeout",
    "test-dead-letter",
    "test-dead-letter-dl",
    "test-dummy",
    "test-empty-queue",
    "test-empty-queue-dl",
    "test-invalid-json",
    "test-listener-one",
    "test-listener-two",
    "test-long-job",
    "test-publish",
    "test-replay",
    "test-replay-dl",
    "test-retry",
    "test-retry-delay",
]
EXCHANGES = ["test_exchange"] + [
    f"{queue}-{suffix}" for queue in QUEUES for suffix in ("retry", "dlx")
]


def main() -> None:
    url = os.environ.get("DOMAIN_EVENT_BROKER", "").replace(",", " ").split()
    params = pika.URLParameters(url[0] if url else "amqp://guest:guest@localhost:5672/%2F")
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for queue in QUEUES:
            channel.queue_delete(queue)
        for exchange in EXCHANGES:
            channel.exchange_delete(exchange)
    finally:
        connection.close()


if __name__ == "__main__":
    main()
