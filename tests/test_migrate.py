"""``domain-event-broker migrate``: a handler's queues change type, nothing is lost."""

from __future__ import annotations

import io
import threading
import time
from contextlib import redirect_stdout
from typing import Any

import pytest

from domain_event_broker import DomainEvent, Publisher, Subscriber, cli
from domain_event_broker._deadletters import migrate as _migrate
from domain_event_broker._deadletters.migrate import MigrationError, migrate_queue_type

from .conftest import Names
from .helpers import (
    BROKER_URL,
    queue_size,
    rabbitmqctl_rows,
    raw_connection,
    wait_for,
)

pytestmark = pytest.mark.slow


def _queue_type(queue: str) -> str:
    """The type of an existing queue, from rabbitmqctl."""
    return dict((row[0], row[1]) for row in rabbitmqctl_rows("queues", "name", "type"))[queue]


class _Stream(threading.Thread):
    """Publishes numbered events until stopped."""

    def __init__(self, key: str) -> None:
        super().__init__(daemon=True)
        self.key = key
        self.sent: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with Publisher() as publisher:
            n = 0
            while not self.stop.is_set():
                publisher.publish_event(DomainEvent(self.key, {"n": f"live-{n}"}))
                self.sent.append(f"live-{n}")
                n += 1
                time.sleep(0.002)


def _fail_all(event: DomainEvent) -> None:
    raise RuntimeError("into the dead-letter queue")


@pytest.mark.parametrize(("start", "target"), [(None, "quorum"), ("quorum", "classic")])
def test_migrate_loses_nothing_while_publishers_publish(
    names: Names, broker_url: str, start: str | None, target: str
) -> None:
    name = names.new("migrate")
    key = f"{name}.event"
    # Three dead letters, and 50 events waiting in the queue (no worker).
    subscriber = Subscriber()
    subscriber.register(_fail_all, name, [key], dead_letter=True, queue_type=start)
    with Publisher() as publisher:
        for n in range(3):
            publisher.publish_event(DomainEvent(key, {"n": f"dead-{n}"}))
    subscriber.start_consuming(timeout=0.5)
    wait_for(lambda: queue_size(f"{name}-dl") == 3, message="3 dead letters")
    subscriber.close()
    with Publisher() as publisher:
        for n in range(50):
            publisher.publish_event(DomainEvent(key, {"n": f"waiting-{n}"}))

    stream = _Stream(key)
    stream.start()
    wait_for(lambda: len(stream.sent) > 20, message="the stream to start")
    lines: list[str] = []
    try:
        moved = migrate_queue_type(name, target, [key], report=lines.append)
        after = len(stream.sent)
        wait_for(lambda: len(stream.sent) > after + 100, message="the stream to go on")
    finally:
        stream.stop.set()
        stream.join(30)

    assert _queue_type(name) == target
    assert _queue_type(f"{name}-dl") == target
    assert queue_size(f"{name}-dl") == 3
    assert moved >= 2 * (50 + 3)
    assert any(line.startswith("done:") for line in lines)

    seen: list[str] = []
    subscriber = Subscriber()
    subscriber.register(
        lambda event: seen.append(event.data["n"]), name, [key], dead_letter=True, queue_type=target
    )
    expected = {f"waiting-{n}" for n in range(50)} | set(stream.sent)
    deadline = time.monotonic() + 60
    while not expected <= set(seen) and time.monotonic() < deadline:
        subscriber.start_consuming(timeout=0.5)
    subscriber.close()
    lost = expected - set(seen)
    assert not lost, f"{len(lost)} event(s) lost"


def test_migrate_refuses_while_workers_consume(names: Names, broker_url: str) -> None:
    name = names.new("migrate-busy")
    consumer = raw_connection()
    try:
        channel = consumer.channel()
        with Subscriber() as subscriber:
            subscriber.register(lambda event: None, name, ["busy.x"])
        channel.basic_consume(name, lambda *args: None)
        with pytest.raises(MigrationError, match="consumer"):
            migrate_queue_type(name, "quorum", ["busy.x"])
    finally:
        consumer.close()
    assert _queue_type(name) == "classic"


def test_migrate_command_prints_what_it_did(names: Names, broker_url: str) -> None:
    name = names.new("migrate-cli")
    with Subscriber() as subscriber:
        subscriber.register(lambda event: None, name, ["cli.x"], dead_letter=True)
    out = io.StringIO()
    with redirect_stdout(out):
        status = cli.main(
            [
                "migrate",
                name,
                "--queue-type",
                "quorum",
                "--binding-key",
                "cli.x",
                "--url",
                BROKER_URL,
            ]
        )
    assert status == 0
    text = out.getvalue()
    assert f"declared {name}-migrating (quorum)" in text
    assert f"done: {name} is a quorum queue, and so is {name}-dl" in text
    assert _queue_type(name) == "quorum"


def test_migrate_unknown_queue_is_an_error(names: Names, broker_url: str) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        migrate_queue_type(names.new("missing"), "quorum", ["x"])


@pytest.mark.parametrize(
    ("queue_type", "keys"), [("stream", ["x"]), ("quorum", []), ("quorum", [""])]
)
def test_migrate_bad_arguments(queue_type: str, keys: Any) -> None:
    with pytest.raises(ValueError):
        migrate_queue_type("anything", queue_type, keys, connection_settings=None)


def test_an_interrupted_migration_resumes(
    names: Names, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = names.new("migrate-resume")
    key = f"{name}.event"
    with Subscriber() as subscriber:
        subscriber.register(lambda event: None, name, [key])
    with Publisher() as publisher:
        for n in range(10):
            publisher.publish_event(DomainEvent(key, {"n": n}))

    def interrupted(self: Any) -> Any:
        raise RuntimeError("test: the connection went away")

    monkeypatch.setattr(_migrate._Migration, "_renew_channel", interrupted)
    with pytest.raises(RuntimeError, match="went away"):
        migrate_queue_type(name, "quorum", [key])
    assert queue_size(name) is None  # deleted, the events wait in the holding queue
    monkeypatch.undo()
    with Publisher() as publisher:
        publisher.publish_event(DomainEvent(key, {"n": 10}))
    lines: list[str] = []
    migrate_queue_type(name, "quorum", [key], report=lines.append)
    assert any("resuming" in line for line in lines)
    assert queue_size(name) == 11
    assert _queue_type(name) == "quorum"
    assert queue_size(f"{name}-migrating") is None


def test_a_queue_that_refills_while_drained_stops_the_migration(names: Names) -> None:
    """A holding queue still bound where its messages go would be drained
    forever; the migration stops with a clear error instead, and keeps them."""
    name = names.new("migrate")
    fanout = f"{name}-loop"
    names.exchanges.append(fanout)
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare(fanout, "fanout")
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, fanout, "")
        for n in range(5):
            channel.basic_publish(fanout, "", str(n).encode())
        migration = _migrate._Migration(
            channel, name, "classic", ("k",), "domain-events", "topic", lambda line: None
        )
        with pytest.raises(MigrationError, match="keeps refilling"):
            migration._drain(name, fanout)
        assert queue_size(name) == 5  # every message is still there
    finally:
        connection.close()
