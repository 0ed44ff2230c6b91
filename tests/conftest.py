"""Fixtures for tests against the real RabbitMQ broker.

Tests skip locally when no broker answers, and fail in CI (CI=true).

Every test that needs a broker gets the ``broker`` marker here, at collection
(see :func:`pytest_collection_modifyitems`), so ``pytest -m "not broker"``
runs the others alone, with no broker at all.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest

from domain_event_broker import close_shared_publishers, reset_defaults
from domain_event_broker._amqp import pika_internals

from .helpers import BROKER_URL, rabbitmqctl_command, raw_connection

#: Directories whose tests all need RabbitMQ: the shared broker (faults, soak)
#: or nodes of their own (cluster, tls).
BROKER_DIRECTORIES = tuple(
    Path(__file__).parent / name for name in ("faults", "cluster", "soak", "tls")
)
#: Fixtures that reach the broker; a test using one, directly or through other
#: fixtures, needs it.
BROKER_FIXTURES = frozenset({"broker_url"})


def needs_broker(item: pytest.Item) -> bool:
    """Whether ``item`` talks to RabbitMQ (see :func:`pytest_collection_modifyitems`)."""
    if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    return any(directory in item.path.parents for directory in BROKER_DIRECTORIES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a broker ``broker``: those using the
    ``broker_url`` fixture, directly or through other fixtures (``names``,
    ``channel``, ...: pytest's closure of the test's fixtures), and every test
    under ``tests/faults``, ``tests/cluster``, ``tests/soak`` and ``tests/tls``.

    A test that reaches the broker without one of those fixtures must ask for
    ``broker_url`` (it then also skips, or fails in CI, when none answers).

    Tests marked ``fast_paths`` (how one of pika_internals' fast paths works)
    skip when the fast paths are off (``make unit-pika-paths``, or a pika
    they do not fit).
    """
    skip_fast = pytest.mark.skip(
        reason=f"pika's fast paths are off: {pika_internals.FAST_PATHS_REASON}"
    )
    for item in items:
        if needs_broker(item):
            item.add_marker(pytest.mark.broker)
        if not pika_internals.FAST_PATHS_ACTIVE and "fast_paths" in item.keywords:
            item.add_marker(skip_fast)


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
def own_vhost_url(broker_url: str) -> Iterator[str]:
    """The test broker's URL with a virtual host of this test's own, made with
    ``rabbitmqctl`` and deleted afterwards.

    For tests that need the ``domain-events`` exchange to themselves, e.g.
    that no queue is bound for a key: on a shared broker some queue (an audit
    firehose) may bind ``#`` to it.
    """
    command = rabbitmqctl_command()
    vhost = f"deb-test-{uuid.uuid4().hex[:10]}"
    user = urlsplit(broker_url).username or "guest"

    def ctl(*args: str) -> None:
        subprocess.run([*command, "-q", *args], check=True, capture_output=True, timeout=60)

    try:
        ctl("add_vhost", vhost)
    except (OSError, subprocess.SubprocessError) as exc:
        message = f"rabbitmqctl is needed for a virtual host of the test's own: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        parts = urlsplit(broker_url)
        yield urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))
    finally:
        close_shared_publishers()  # their connections to it are closed by its deletion
        ctl("delete_vhost", vhost)


@pytest.fixture
def names(broker_url: str) -> Iterator[Names]:
    """Unique handler names for this test, cleaned up afterwards."""
    registry = Names()
    yield registry
    registry.cleanup()
