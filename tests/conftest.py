"""Fixtures for tests against the real RabbitMQ broker.

Tests skip locally when no broker answers, and fail in CI (CI=true).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from domain_event_broker import reset_defaults

from .helpers import BROKER_URL, rabbitmqctl_command, raw_connection


def _broker_answers() -> bool:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    except pika.exceptions.AMQPError:
        return False
    connection.close()
    return True


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The URL of the running test broker."""
    if not _broker_answers():
        if os.environ.get("CI"):
            pytest.fail(f"no RabbitMQ broker answers at {BROKER_URL}")
        pytest.skip(f"no RabbitMQ broker answers at {BROKER_URL}")
    return BROKER_URL


@pytest.fixture(autouse=True)
def _reset_library_defaults() -> Iterator[None]:
    reset_defaults()
    yield
    reset_defaults()


@pytest.fixture
def channel(broker_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A raw pika channel to the test broker, for setting up and checking."""
    connection = raw_connection()
    yield connection.channel()
    if connection.is_open:
        connection.close()


class Names:
    """Unique names for one test; everything derived from them is deleted after it."""

    def __init__(self) -> None:
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def new(self, prefix: str = "test") -> str:
        """A fresh handler name; its queues and exchanges are cleaned up."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.queues.append(name)
        return name

    def cleanup(self) -> None:
        connection = raw_connection()
        try:
            channel = connection.channel()
            # Delay queues (name-delay-<ms>-<type>) are deleted at the end of
            # the session, and their auto-delete exchanges with them.
            for name in self.queues:
                for queue in [name, f"{name}-dl"]:
                    channel.queue_delete(queue)
                for exchange in [
                    f"{name}-retry",
                    f"{name}-dlx",
                    f"{name}-retry-durable",
                    f"{name}-dlx-durable",
                ]:
                    channel.exchange_delete(exchange)
                _USED_NAMES.append(name)
            for exchange in self.exchanges:
                channel.exchange_delete(exchange)
        finally:
            connection.close()


#: Handler names of this session: their delay queues are deleted at its end.
_USED_NAMES: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _delete_delay_queues() -> Iterator[None]:
    """Delete the session's delay queues (4.1's live an hour after their last use)."""
    yield
    if not _USED_NAMES:
        return
    command = rabbitmqctl_command()
    try:
        listed = subprocess.run(
            [*command, "-q", "list_queues", "name", "--no-table-headers"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return  # they expire by themselves
    prefixes = tuple(f"{name}-delay-" for name in _USED_NAMES)
    doomed = [queue for queue in listed if queue.startswith(prefixes)]
    if not doomed:
        return
    connection = raw_connection()
    try:
        channel = connection.channel()
        for queue in doomed:
            channel.queue_delete(queue)
    finally:
        connection.close()


@pytest.fixture
def names(broker_url: str) -> Iterator[Names]:
    """Unique handler names for this test, cleaned up afterwards."""
    registry = Names()
    yield registry
    registry.cleanup()
