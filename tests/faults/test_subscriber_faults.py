"""A consuming Subscriber carries on through broker faults."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
import uuid
from typing import Any

import pytest

from domain_event_broker import (
    AuthenticationError,
    DomainEvent,
    Publisher,
    Subscriber,
)
from domain_event_broker._amqp import pika_internals
from domain_event_broker.subscribe import DEFAULT_PREFETCH_COUNT

from ..helpers import BROKER_URL, queue_size, raw_connection, wait_for
from .control import REPORTS, RabbitControl, Recorder, library_records, unique
from .proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

SUBSCRIBE_LOGGER = "domain_event_broker.subscribe"


def _records(caplog: pytest.LogCaptureFixture, level: int, logger: str) -> list[logging.LogRecord]:
    return [r for r in library_records(caplog, level) if r.name == logger]


def _consuming(
    names: Any,
    run_subscriber: Any,
    url: str | list[str] = BROKER_URL,
    handler: Any = None,
    queue_type: str | None = None,
) -> tuple[Any, Recorder, str, str]:
    name = names.new("faults")
    routing_key = unique()
    recorder = handler or Recorder()
    subscriber = Subscriber(url, timeout=10)
    subscriber.register(recorder, name, [routing_key], queue_type=queue_type)
    runner = run_subscriber(subscriber)
    return runner, recorder, name, routing_key


def _publish(routing_key: str, n: int = 0) -> DomainEvent:
    with Publisher(BROKER_URL, timeout=20) as publisher:
        return publisher.publish_event(DomainEvent(routing_key, {"n": n}))


def _receives(recorder: Recorder, event: DomainEvent, timeout: float = 30) -> None:
    wait_for(
        lambda: event.uuid_string in recorder.uuids(),
        timeout=timeout,
        message=f"the subscriber to receive {event.uuid_string}",
    )


def _one_loss_one_recovery(caplog: pytest.LogCaptureFixture, *fragments: str) -> None:
    warnings = _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER)
    infos = _records(caplog, logging.INFO, SUBSCRIBE_LOGGER)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert len(infos) == 1, [r.getMessage() for r in infos]
    assert "Reconnected" in infos[0].getMessage()
    for fragment in fragments:
        assert fragment in warnings[0].getMessage()
    assert all(r.exc_info is None for r in warnings + infos), "no tracebacks"


def test_connection_closed_by_broker(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner, recorder, _, routing_key = _consuming(names, run_subscriber)
    _receives(recorder, _publish(routing_key, 1))

    rabbitmq.close_all_connections()
    wait_for(
        lambda: _records(caplog, logging.INFO, SUBSCRIBE_LOGGER),
        timeout=30,
        message="the subscriber to reconnect",
    )

    _receives(recorder, _publish(routing_key, 2))
    runner.assert_running()
    _one_loss_one_recovery(caplog, "320")
    # Consumer, prefetch and confirm mode are restored on the new channel.
    channels = rabbitmq.ctl(
        "list_channels", "confirm", "prefetch_count", "consumer_count", "--no-table-headers"
    )
    expected = ["true", str(DEFAULT_PREFETCH_COUNT), "1"]
    assert any(line.split() == expected for line in channels.splitlines()), channels
    runner.stop()


def test_broker_restart(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner, recorder, _, routing_key = _consuming(names, run_subscriber)
    _receives(recorder, _publish(routing_key, 1))

    rabbitmq.stop_app()
    wait_for(
        lambda: _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER),
        timeout=30,
        message="the subscriber to notice",
    )
    runner.assert_running()
    rabbitmq.start_app()

    _receives(recorder, _publish(routing_key, 2))
    runner.assert_running()
    _one_loss_one_recovery(caplog)
    runner.stop()


def test_lost_socket(
    names: Any, run_subscriber: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner, recorder, _, routing_key = _consuming(names, run_subscriber, proxy.url(BROKER_URL))
    _receives(recorder, _publish(routing_key, 1))

    assert proxy.cut() == 1

    _receives(recorder, _publish(routing_key, 2))
    assert proxy.accepted == 2
    runner.assert_running()
    _one_loss_one_recovery(caplog)
    runner.stop()


def test_missed_heartbeats(
    names: Any, run_subscriber: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = proxy.url(BROKER_URL, heartbeat="1")
    runner, recorder, _, routing_key = _consuming(names, run_subscriber, url)
    _receives(recorder, _publish(routing_key, 1))

    proxy.freeze()  # the wire goes silent; no FIN, no RST

    wait_for(lambda: proxy.accepted == 2, timeout=30, message="a new connection")
    _receives(recorder, _publish(routing_key, 2))
    runner.assert_running()
    _one_loss_one_recovery(caplog)
    runner.stop()


def test_wrong_password_is_raised_at_once(broker_url: str) -> None:
    url = broker_url.replace("guest:guest@", "guest:wrong-password@")
    assert url != broker_url
    subscriber = Subscriber(url, timeout=60)
    with pytest.raises(AuthenticationError) as raised:
        subscriber.register(Recorder(), "faults-never-declared", ["faults.never"])
    assert "wrong-password" not in str(raised.value)
    publisher = Publisher(url, timeout=60)
    with pytest.raises(AuthenticationError):
        publisher.publish("{}", "faults.never")


def test_refused_virtual_host_is_raised_at_once(broker_url: str) -> None:
    url = broker_url.rsplit("/", 1)[0] + "/no-such-vhost-" + unique()
    with pytest.raises(AuthenticationError):
        Subscriber(url, timeout=60).register(Recorder(), "faults-never-declared", ["faults.never"])


def test_in_flight_delivery_is_not_acked_on_the_new_channel(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that returns after its channel died must not ack on the new one.

    On the new channel the redelivery gets the same delivery tag (1): a stale
    ack would acknowledge the redelivery before its handler ran. A second
    loss while that redelivery is being handled tells: it must come a third
    time, so it cannot have been acknowledged.
    """
    caplog.set_level(logging.INFO)
    releases = [threading.Event(), threading.Event()]
    seen: list[DomainEvent] = []

    def handler(event: DomainEvent) -> None:
        seen.append(event)
        if len(seen) <= len(releases):
            releases[len(seen) - 1].wait(30)

    def reconnections() -> int:
        return len(_records(caplog, logging.INFO, SUBSCRIBE_LOGGER))

    runner, _, name, routing_key = _consuming(names, run_subscriber, handler=handler)
    event = _publish(routing_key)
    for run in (1, 2):
        wait_for(lambda run=run: len(seen) == run, message=f"run {run} of the handler")
        rabbitmq.close_all_connections()
        wait_for(lambda run=run: reconnections() == run, timeout=30, message="a reconnection")
        releases[run - 1].set()  # this run returns after its channel is gone

    wait_for(lambda: len(seen) == 3, message="the second redelivery")
    assert [e.uuid_string for e in seen] == [event.uuid_string] * 3
    assert [e.redelivered for e in seen] == [False, True, True]
    wait_for(lambda: queue_size(name) == 0, message="the queue to be empty")
    runner.assert_running()
    warnings = _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER)
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert reconnections() == 2


def test_queue_deleted_under_running_subscriber(
    names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner, recorder, name, routing_key = _consuming(names, run_subscriber)
    _receives(recorder, _publish(routing_key, 1))

    connection = raw_connection()
    connection.channel().queue_delete(name)
    connection.close()

    # Declared again, bound again, consumed again.
    def consumed_again() -> bool:
        connection = raw_connection()
        try:
            result = connection.channel().queue_declare(name, passive=True)
            return bool(result.method.consumer_count == 1)
        except Exception:
            return False
        finally:
            if connection.is_open:
                connection.close()

    wait_for(consumed_again, timeout=30, message="the queue to be declared and consumed again")
    _receives(recorder, _publish(routing_key, 2))
    runner.assert_running()
    warnings = _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER)
    assert len(warnings) == 1 and "cancelled" in warnings[0].getMessage()
    runner.stop()


@pytest.mark.slow
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_handler_past_consumer_timeout(
    rabbitmq: RabbitControl,
    names: Any,
    run_subscriber: Any,
    caplog: pytest.LogCaptureFixture,
    queue_type: str,
) -> None:
    """A handler overruns the broker's consumer_timeout; the worker survives.

    Before RabbitMQ 4.3 the channel enforces it for every queue type: the
    broker closes the channel (406), the subscriber reopens it and the event
    comes again. From 4.3 on the queue enforces it: a quorum queue cancels the
    consumer (basic.cancel), puts the event back and ignores the late
    acknowledgement; the subscriber says so and consumes again, and the event
    comes again. A classic queue has no consumer timeout from 4.3 on: the
    event is handled once and acknowledged.
    """
    caplog.set_level(logging.INFO)
    # Read by each new channel: a 2 s consumer timeout, checked twice a second.
    rabbitmq.set_env(consumer_timeout=2000, channel_tick_interval=500)
    by_queue = rabbitmq.version() >= (4, 3)
    no_timeout = by_queue and queue_type == "classic"
    seen: list[DomainEvent] = []

    def handler(event: DomainEvent) -> None:
        seen.append(event)
        if len(seen) > 1:
            return
        if no_timeout:
            time.sleep(5)  # well past the timeout, which nothing enforces
            return
        wait_for(  # overrun the consumer timeout
            lambda: _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER),
            timeout=30,
            message="the broker to close the channel or cancel the consumer",
        )

    runner, _, name, routing_key = _consuming(
        names, run_subscriber, handler=handler, queue_type=queue_type
    )
    event = _publish(routing_key, 1)
    if no_timeout:
        wait_for(lambda: seen, message="the event")
        time.sleep(6)
        assert [e.uuid_string for e in seen] == [event.uuid_string]
        assert [e.redelivered for e in seen] == [False]
    else:
        wait_for(lambda: len(seen) == 2, timeout=40, message="the redelivery")
        assert [e.uuid_string for e in seen] == [event.uuid_string] * 2
        assert [e.redelivered for e in seen] == [False, True]
    handled = len(seen)
    later = _publish(routing_key, 2)
    wait_for(lambda: len(seen) == handled + 1, message="the next event")
    assert seen[-1].uuid_string == later.uuid_string
    # Acknowledged: nothing ready and nothing unacknowledged.
    wait_for(lambda: rabbitmq.queue_messages(name) == 0, message="the queue to be empty")
    runner.assert_running()
    if no_timeout:
        assert _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER) == []
    elif by_queue:
        warnings = _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER)
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        message = warnings[0].getMessage()
        assert f"cancelled the consumer of handler {name}" in message
        assert "consumer_timeout" in message
        assert warnings[0].exc_info is None
    else:
        # Without pika's fast paths the reason (and the hint) is pika's secret.
        hint = "consumer_timeout" if pika_internals.FAST_PATHS_ACTIVE else ""
        _one_loss_one_recovery(caplog, hint)
    runner.stop()


def test_failover_to_the_next_url(
    names: Any, run_subscriber: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The first node (a proxy standing in for it) goes down: the second takes over."""
    caplog.set_level(logging.INFO)
    urls = [proxy.url(BROKER_URL), BROKER_URL]
    runner, recorder, _, routing_key = _consuming(names, run_subscriber, urls)
    _receives(recorder, _publish(routing_key, 1))
    assert proxy.open_connections == 1  # the first URL was used

    proxy.refuse()
    proxy.cut()

    _receives(recorder, _publish(routing_key, 2))
    assert proxy.open_connections == 0
    runner.assert_running()
    _one_loss_one_recovery(caplog)
    runner.stop()


def test_stop_consuming_during_an_outage(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop request is not held up by reconnection attempts."""
    caplog.set_level(logging.INFO)
    name = names.new("faults")
    subscriber = Subscriber(BROKER_URL, timeout=60)
    subscriber.register(Recorder(), name, [unique()])
    runner = run_subscriber(subscriber)
    wait_for(
        lambda: subscriber._loop is not None and subscriber._loop.consuming, message="consuming"
    )
    rabbitmq.stop_app()
    wait_for(
        lambda: _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER),
        timeout=30,
        message="the subscriber to notice",
    )
    started = time.monotonic()
    subscriber.stop_consuming()
    assert runner.returned.wait(10), "start_consuming() kept reconnecting after stop"
    assert time.monotonic() - started < 10
    assert runner.error is None


def test_credentials_revoked_while_consuming(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, broker_url: str
) -> None:
    """After a loss, refused credentials end start_consuming() with an error, at once."""
    user = f"faults-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    rabbitmq.ctl("add_user", user, password)
    try:
        rabbitmq.ctl("set_permissions", "-p", rabbitmq.vhost, user, ".*", ".*", ".*")
        parts = urllib.parse.urlsplit(broker_url)
        host = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))
        runner, recorder, _, routing_key = _consuming(names, run_subscriber, url)
        _receives(recorder, _publish(routing_key, 1))

        rabbitmq.ctl("delete_user", user)
        rabbitmq.close_all_connections()

        assert runner.returned.wait(30), "start_consuming() kept retrying refused credentials"
        assert isinstance(runner.error, AuthenticationError), runner.error
        assert password not in str(runner.error)
    finally:
        with contextlib.suppress(RuntimeError):
            rabbitmq.ctl("delete_user", user)


class _Timeline:
    """A handler that notes when it starts each event, then works a while."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float]] = []

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.calls.append((event.uuid_string, time.time()))
        time.sleep(self.seconds)  # the handler's work

    def started(self) -> list[tuple[str, float]]:
        with self.lock:
            return list(self.calls)

    def between(self, start: float, end: float) -> list[str]:
        return [uuid_string for uuid_string, at in self.started() if start <= at <= end]

    def distinct(self) -> set[str]:
        return {uuid_string for uuid_string, _ in self.started()}


def _outage_backlog(
    names: Any, run_subscriber: Any, url: str, count: int
) -> tuple[Any, _Timeline, list[str]]:
    """A subscriber with ``count`` events queued for a slow handler, the
    first of them started."""
    name = names.new("faults")
    routing_key = unique()
    handler = _Timeline(0.3)
    subscriber = Subscriber(url, timeout=60)
    subscriber.register(handler, name, [routing_key])
    with Publisher(BROKER_URL, timeout=20) as publisher:
        uuids = [
            publisher.publish_event(DomainEvent(routing_key, {"n": n})).uuid_string
            for n in range(count)
        ]
    runner = run_subscriber(subscriber)
    wait_for(lambda: handler.started(), message="the first event to start")
    return runner, handler, uuids


def _lost_at(caplog: pytest.LogCaptureFixture) -> float:
    """When the subscriber logged the loss (wall clock)."""
    lost = wait_for(
        lambda: _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER),
        timeout=60,
        message="the subscriber to notice the loss",
    )
    return lost[0].created


def test_no_handler_starts_on_a_delivery_of_a_lost_connection(
    names: Any, run_subscriber: Any, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23, item 5: during an outage, what the lost channel had delivered
    (prefetched, not started) is not handled: its acknowledgement could not
    go out, and the broker delivers it again after the outage."""
    caplog.set_level(logging.INFO)
    runner, handler, uuids = _outage_backlog(names, run_subscriber, proxy.url(BROKER_URL), 12)

    proxy.refuse()  # the node is down: no new connection until it is back
    assert proxy.cut() == 1
    lost_at = _lost_at(caplog)
    outage = 2.0  # the outage lasts this long, whatever the subscriber does
    time.sleep(max(0.0, lost_at + outage - time.time()))
    back_at = time.time()
    proxy.refuse(False)

    wait_for(lambda: handler.distinct() == set(uuids), timeout=60, message="every event")
    during = handler.between(lost_at, back_at)
    assert during == [], f"{len(during)} handler call(s) started while the connection was down"
    counts = [uuid_string for uuid_string, _ in handler.started()]
    twice = len(counts) - len(set(counts))
    # At most the event running at the cut: its acknowledgement was lost.
    assert twice <= 1, f"{twice} events handled twice"
    runner.assert_running()
    runner.stop()


@pytest.mark.slow
def test_broker_stopped_under_a_backlog(
    rabbitmq: RabbitControl, names: Any, run_subscriber: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23, item 5, as found: the broker stopped for 5 s under a backlog
    of 30. Before the fix, 25 were handled twice, 11-12 calls while down."""
    caplog.set_level(logging.INFO)
    runner, handler, uuids = _outage_backlog(names, run_subscriber, BROKER_URL, 30)

    rabbitmq.stop_app()
    stopped_at = time.time()
    lost_at = _lost_at(caplog)
    time.sleep(max(0.0, stopped_at + 5.0 - time.time()))  # the outage lasts 5 s
    start_at = time.time()
    rabbitmq.start_app()

    wait_for(lambda: handler.distinct() == set(uuids), timeout=90, message="every event")
    during = handler.between(lost_at, start_at)
    assert during == [], f"{len(during)} handler call(s) started while the broker was down"
    counts = [uuid_string for uuid_string, _ in handler.started()]
    REPORTS.append(
        f"broker stopped 5 s under a backlog of {len(uuids)}: "
        f"{len(counts) - len(set(counts))} handled twice, 0 started while down"
    )
    runner.assert_running()
    runner.stop()


def _with_credentials(url: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.mark.parametrize("file_first", [True, False], ids=["file-first", "loss-first"])
def test_rotated_password_is_used_when_reconnecting(
    file_first: bool,
    rabbitmq: RabbitControl,
    names: Any,
    run_subscriber: Any,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 23, item 10: DOMAIN_EVENT_BROKER_FILE rewritten with a new
    password, then the connection drops: the running subscriber reconnects
    with the new password (it used the old one and raised AuthenticationError).
    When the connection drops before the file is rewritten, the refused
    credentials are retried (the file read again) for up to the timeout."""
    caplog.set_level(logging.INFO)
    user = f"faults-{uuid.uuid4().hex[:8]}"
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    rabbitmq.ctl("add_user", user, old)
    try:
        rabbitmq.ctl("set_permissions", "-p", rabbitmq.vhost, user, ".*", ".*", ".*")
        secret = tmp_path / "broker-url"
        secret.write_text(_with_credentials(broker_url, user, old) + "\n")
        monkeypatch.delenv("DOMAIN_EVENT_BROKER", raising=False)
        monkeypatch.setenv("DOMAIN_EVENT_BROKER_FILE", str(secret))
        name = names.new("faults")
        routing_key = unique()
        recorder = Recorder()
        subscriber = Subscriber(timeout=10)  # the configured source: the file
        subscriber.register(recorder, name, [routing_key])
        runner = run_subscriber(subscriber)
        _receives(recorder, _publish(routing_key, 1))

        # The secret manager's rotation: the broker first, then the file.
        rabbitmq.ctl("change_password", user, new)
        rotated = f"# rotated\n{_with_credentials(broker_url, user, new)}\n"
        if file_first:
            secret.write_text(rotated)
            rabbitmq.close_all_connections()
        else:
            rabbitmq.close_all_connections()
            wait_for(
                lambda: any(
                    "refused the credentials" in r.getMessage()
                    for r in _records(caplog, logging.WARNING, SUBSCRIBE_LOGGER)
                ),
                timeout=10,
                message="the old password to be refused",
            )
            secret.write_text(rotated)

        _receives(recorder, _publish(routing_key, 2))
        runner.assert_running()
        runner.stop()
        text = "\n".join(record.getMessage() for record in caplog.records)
        assert old not in text and new not in text, "no password in the log"
    finally:
        with contextlib.suppress(RuntimeError):
            rabbitmq.ctl("delete_user", user)
