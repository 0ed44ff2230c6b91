"""Subscriber against the real broker: topology, retries, dead letters, stopping."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

import domain_event_broker._subscribing.consume_loop as consume_loop_module
import domain_event_broker._subscribing.subscriber as subscriber_module
from domain_event_broker import (
    ConfigurationError,
    DomainEvent,
    Publisher,
    Retry,
    Subscriber,
    SubscriberStoppingError,
    publish_domain_event,
)

from .conftest import Names
from .helpers import (
    BROKER_URL,
    consumer_count,
    exchange_exists,
    get_messages,
    queue_size,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent


def nop(event: DomainEvent) -> None:
    pass


class Recorder:
    """A handler that records the events it saw (thread-safe)."""

    def __init__(self, action: Any = None) -> None:
        self.events: list[DomainEvent] = []
        self.lock = threading.Lock()
        self.action = action

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.events.append(event)
        if self.action is not None:
            self.action(event)

    def count(self) -> int:
        with self.lock:
            return len(self.events)


def consume_until(subscriber: Subscriber, predicate: Any, timeout: float = 15.0) -> None:
    """Consume in a thread until ``predicate()`` holds, then stop and join."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            subscriber.start_consuming(timeout=timeout)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(predicate, timeout=timeout)
    finally:
        subscriber.stop_consuming()
        thread.join(timeout=30)
    assert not thread.is_alive(), "start_consuming() did not return after stop_consuming()"
    if errors:
        raise errors[0]


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "domain-event-broker-worker"]


def publish_raw(
    routing_key: str, body: bytes, properties: pika.BasicProperties | None = None
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("domain-events", routing_key, body, properties)
    finally:
        connection.close()


# -- register() ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"handler": 42}, TypeError),
        ({"name": ""}, ValueError),
        ({"binding_keys": []}, ValueError),
        ({"binding_keys": "user.registered"}, ValueError),
        ({"binding_keys": [""]}, ValueError),
        ({"max_retries": -1}, ValueError),
    ],
)
def test_register_refuses_bad_arguments(names: Names, kwargs: dict[str, Any], error: type) -> None:
    name = names.new("bad-args")
    arguments: dict[str, Any] = {"handler": nop, "name": name, "binding_keys": ["a.b"]}
    arguments.update(kwargs)
    with Subscriber() as subscriber, pytest.raises(error):
        subscriber.register(**arguments)
    assert not queue_exists_named(name)


def queue_exists_named(name: str) -> bool:
    return queue_size(name) is not None


def test_register_twice_same_name_refused(names: Names) -> None:
    name = names.new()
    subscriber = Subscriber()
    subscriber.register(nop, name, ["a.b"])
    with pytest.raises(ValueError, match="already registered"):
        subscriber.register(nop, name, ["a.c"])
    subscriber.close()


def test_prefetch_count_validated() -> None:
    with pytest.raises(ValueError):
        Subscriber(prefetch_count=0)
    with pytest.raises(ValueError):
        Subscriber(prefetch_count=True)


def test_register_declares_whole_topology(names: Names) -> None:
    name = names.new("topology")
    subscriber = Subscriber()
    subscriber.register(nop, name, ["topo.a", "topo.b"], dead_letter=True)
    subscriber.close()
    assert queue_size(name) == 0
    assert queue_size(f"{name}-dl") == 0
    assert exchange_exists(f"{name}-retry")
    assert exchange_exists(f"{name}-dlx")
    # Bindings: an event published to the events exchange, to the retry
    # exchange, and to the dead-letter exchange arrives where it should.
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    for exchange in ("domain-events", f"{name}-retry"):
        for key in ("topo.a", "topo.b"):
            channel.basic_publish(exchange, key, b"{}", mandatory=True)
    channel.basic_publish(f"{name}-dlx", "topo.b", b"{}", mandatory=True)
    connection.close()
    assert queue_size(name) == 4
    assert queue_size(f"{name}-dl") == 1


def test_takes_over_queues_declared_by_302(names: Names, channel: Any) -> None:
    """Declarations identical to 3.0.2's: no PRECONDITION_FAILED."""
    name = names.new("takeover")
    # What 3.0.2's register(dead_letter=True) declares.
    channel.exchange_declare(exchange=f"{name}-dlx", exchange_type="topic")
    channel.queue_declare(queue=f"{name}-dl", durable=True)
    channel.queue_declare(
        queue=name, durable=True, arguments={"x-dead-letter-exchange": f"{name}-dlx"}
    )
    channel.exchange_declare(exchange=f"{name}-retry", exchange_type="topic")
    # ... and its delay queue for Retry(0.1).
    channel.queue_declare(
        queue=f"{name}-delay-100",
        durable=True,
        arguments={
            "x-dead-letter-exchange": f"{name}-retry",
            "x-message-ttl": 100,
            "x-expires": 10100,
        },
    )
    channel.exchange_declare(
        exchange=f"{name}-delay-100", durable=True, auto_delete=True, exchange_type="topic"
    )

    recorder = Recorder(lambda event: (_ for _ in ()).throw(Retry(0.1)))
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["takeover.x"], dead_letter=True, max_retries=1)
    publish_domain_event("takeover.x", {})
    consume_until(subscriber, lambda: queue_size(f"{name}-dl") == 1)
    assert [event.retries for event in recorder.events] == [0, 1]


def test_topology_declared_once_before_consuming(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """register() declares; start_consuming() on the same channel does not again."""
    declared: list[str] = []
    real = BlockingChannel.queue_declare

    def spy(self: BlockingChannel, queue: str, *args: Any, **kwargs: Any) -> Any:
        declared.append(queue)
        return real(self, queue, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "queue_declare", spy)
    name = names.new("declare-once")
    recorder = Recorder()
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["declareonce.x"], dead_letter=True)
    after_register = list(declared)
    assert name in after_register
    assert f"{name}-dl" in after_register
    publish_domain_event("declareonce.x", {})
    consume_until(subscriber, lambda: recorder.count() == 1)
    assert declared == after_register


def test_changed_queue_arguments_give_a_clear_error(names: Names) -> None:
    name = names.new("changed")
    with Subscriber() as subscriber:
        subscriber.register(nop, name, ["changed.x"])
    with Subscriber() as subscriber, pytest.raises(ConfigurationError, match="already exists"):
        subscriber.register(nop, name, ["changed.x"], dead_letter=True)


def test_disabled_broker_needs_nothing(names: Names) -> None:
    name = names.new("disabled")
    subscriber = Subscriber(connection_settings=None)
    subscriber.register(nop, name, ["x.y"])
    subscriber.start_consuming(timeout=0.1)
    assert subscriber.channel is None
    assert not queue_exists_named(name)


# -- consuming ------------------------------------------------------------------


def test_handlers_run_one_at_a_time_in_queue_order(names: Names) -> None:
    name = names.new("order")
    active = 0
    most_active = 0
    lock = threading.Lock()

    def slow(event: DomainEvent) -> None:
        nonlocal active, most_active
        with lock:
            active += 1
            most_active = max(most_active, active)
        time.sleep(0.005)
        with lock:
            active -= 1

    recorder = Recorder(slow)
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["order.x", "order.y"])
    published = [
        publish_domain_event("order.x" if i % 2 else "order.y", {"i": i}) for i in range(50)
    ]
    consume_until(subscriber, lambda: recorder.count() == 50)
    assert [e.data["i"] for e in recorder.events] == list(range(50))
    assert [e.uuid_string for e in recorder.events] == [e.uuid_string for e in published]
    assert most_active == 1
    assert wait_for(lambda: queue_size(name) == 0)


def test_several_handlers_on_one_subscriber(names: Names) -> None:
    one, two = Recorder(), Recorder()
    first, second = names.new("one"), names.new("two")
    subscriber = Subscriber()
    subscriber.register(one, first, ["several.one"])
    subscriber.register(two, second, ["several.two", "several.one"])
    publish_domain_event("several.one", {})
    publish_domain_event("several.two", {})
    consume_until(subscriber, lambda: one.count() == 1 and two.count() == 2)
    assert {e.routing_key for e in two.events} == {"several.one", "several.two"}


@pytest.mark.parametrize(
    ("options", "published", "ready"),
    [({"prefetch_count": 3}, 10, 7), ({}, 130, 30)],
    ids=["prefetch_count=3", "default 100"],
)
def test_prefetch_count_limits_events_in_flight(
    names: Names, options: dict[str, int], published: int, ready: int
) -> None:
    name = names.new("prefetch")
    key = f"{name}.x"
    release = threading.Event()
    recorder = Recorder(lambda event: release.wait(20))
    subscriber = Subscriber(**options)
    subscriber.register(recorder, name, [key])
    with Publisher() as publisher:
        publisher.publish_many([DomainEvent(key, {"i": i}) for i in range(published)])
    thread = threading.Thread(target=subscriber.start_consuming, kwargs={"timeout": 30})
    thread.start()
    try:
        wait_for(lambda: recorder.count() == 1)
        # The prefetch window sent ahead of acknowledgement, the rest waiting.
        wait_for(lambda: queue_size(name) == ready, message=f"{ready} ready in the queue")
    finally:
        release.set()
        subscriber.stop_consuming()
        thread.join(30)


def test_timeout_stops_consuming_and_cleans_up(names: Names) -> None:
    name = names.new("timeout")
    subscriber = Subscriber()
    subscriber.register(nop, name, [f"{name}.#"])
    started = time.monotonic()
    subscriber.start_consuming(timeout=0.5)
    # At least the timeout; the upper bound only catches a timeout ignored.
    assert 0.5 <= time.monotonic() - started < 60
    assert not worker_threads()
    assert subscriber._link is None or subscriber._link.connection is None


class ShiftedClock:
    """The ``time`` module of the subscriber's deadline code, with a hand on
    it: :meth:`advance` moves ``monotonic()`` on, so that a test makes the
    deadline of ``start_consuming(timeout=...)`` pass when it chooses."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_timeout_leaves_events_not_started_in_the_queue(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the deadline the running handler finishes; prefetched events are not started."""
    clock = ShiftedClock()
    monkeypatch.setattr(subscriber_module, "time", clock)
    monkeypatch.setattr(consume_loop_module, "time", clock)
    name = names.new("timeout-prefetched")
    release = threading.Event()
    recorder = Recorder(lambda event: release.wait(30))
    subscriber = Subscriber()
    subscriber.register(recorder, name, [f"{name}.x"])
    for i in range(6):
        publish_domain_event(f"{name}.x", {"i": i})
    thread = threading.Thread(target=subscriber.start_consuming, kwargs={"timeout": 600})
    thread.start()
    try:
        # The first event runs (the others, prefetched, wait for the one
        # handler thread); then the deadline passes, and the subscriber stops
        # consuming while the handler still runs.
        wait_for(lambda: recorder.count() == 1, timeout=30, message="the first event to start")
        clock.advance(600)
        wait_for(lambda: consumer_count(name) == 0, timeout=30, message="the consumer to go")
    finally:
        release.set()
        thread.join(30)
        if thread.is_alive():  # the deadline did not stop it
            subscriber.stop_consuming()
            thread.join(30)
    assert recorder.count() == 1  # the running one finished; no other started
    # The handled event was acknowledged, the others returned to the queue.
    assert wait_for(lambda: queue_size(name) == 5)
    assert recorder.count() == 1


def test_long_handler_keeps_heartbeats_flowing(names: Names) -> None:
    """A handler running four heartbeat intervals finishes and is acknowledged."""
    name = names.new("heartbeat")
    recorder = Recorder(lambda event: time.sleep(4.0))
    subscriber = Subscriber(BROKER_URL + "?heartbeat=1")
    subscriber.register(recorder, name, ["heartbeat.x"])
    publish_domain_event("heartbeat.x", {})
    consume_until(subscriber, lambda: recorder.count() == 1 and queue_size(name) == 0, timeout=30)
    # Nothing redelivered: the connection survived the long handler.
    assert queue_size(name) == 0
    assert recorder.count() == 1


def test_auto_delete_queue_vanishes(names: Names) -> None:
    name = names.new("autodelete")
    recorder = Recorder()
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["autodelete.x"], auto_delete=True)
    publish_domain_event("autodelete.x", {})
    consume_until(subscriber, lambda: recorder.count() == 1)
    wait_for(lambda: not queue_exists_named(name))


def test_stop_consuming_from_inside_a_handler(names: Names) -> None:
    name = names.new("stop-inside")
    subscriber = Subscriber()
    recorder = Recorder(lambda event: subscriber.stop_consuming())
    subscriber.register(recorder, name, ["stopinside.x"])
    publish_domain_event("stopinside.x", {"n": 1})
    publish_domain_event("stopinside.x", {"n": 2})
    subscriber.start_consuming(timeout=20)
    # The first event was handled and acknowledged; the second waits in the queue.
    assert [e.data["n"] for e in recorder.events] == [1]
    assert wait_for(lambda: queue_size(name) == 1)
    assert not worker_threads()


def test_register_from_a_handler_after_stop_consuming_fails_at_once(names: Names) -> None:
    """Issue 23, item 4: it hung the stop for the register timeout (30 s), then
    said "the connection is down" while it was up."""
    name = names.new("stop-register")
    late = names.new("stop-register-late")
    errors: list[BaseException] = []

    def handler(event: DomainEvent) -> None:
        subscriber.stop_consuming()
        try:
            subscriber.register(nop, late, ["stopregister.late"])
        except BaseException as exc:
            errors.append(exc)

    subscriber = Subscriber(timeout=20)
    subscriber.register(handler, name, ["stopregister.x"])
    publish_domain_event("stopregister.x", {})
    started = time.monotonic()
    subscriber.start_consuming(timeout=40)
    assert time.monotonic() - started < 10, "the stop waited for register()"
    assert len(errors) == 1 and isinstance(errors[0], SubscriberStoppingError), errors
    assert isinstance(errors[0], RuntimeError)
    assert "stopping" in str(errors[0]) and late in str(errors[0])
    assert not queue_exists_named(late), "nothing is declared for it"
    assert queue_size(name) == 0, "the handler's own event was acknowledged"
    # After start_consuming() returned, registering works again.
    subscriber.register(nop, late, ["stopregister.late"])
    assert queue_exists_named(late)
    subscriber.close()


def test_register_from_another_thread_while_stopping_fails_at_once(names: Names) -> None:
    name = names.new("stopping-register")
    late = names.new("stopping-register-late")
    release = threading.Event()

    def slow(event: DomainEvent) -> None:
        release.wait(20)  # the stop waits for this handler

    subscriber = Subscriber(timeout=20)
    subscriber.register(slow, name, ["stoppingregister.x"])
    publish_domain_event("stoppingregister.x", {})
    thread = threading.Thread(target=subscriber.start_consuming)
    thread.start()
    try:
        wait_for(lambda: subscriber._loop is not None and subscriber._loop._in_flight == 1)
        subscriber.stop_consuming()
        started = time.monotonic()
        with pytest.raises(SubscriberStoppingError, match="stopping"):
            subscriber.register(nop, late, ["stoppingregister.late"])
        assert time.monotonic() - started < 2
    finally:
        release.set()
        thread.join(20)
    assert not thread.is_alive()
    assert not queue_exists_named(late)


def test_stop_consuming_from_another_thread_waits_for_the_handler(names: Names) -> None:
    name = names.new("stop-thread")
    started = threading.Event()
    finished = threading.Event()

    def slow(event: DomainEvent) -> None:
        started.set()
        time.sleep(0.5)
        finished.set()

    subscriber = Subscriber()
    subscriber.register(slow, name, ["stopthread.x"])
    publish_domain_event("stopthread.x", {})
    thread = threading.Thread(target=subscriber.start_consuming)
    thread.start()
    assert started.wait(10)
    subscriber.stop_consuming()
    thread.join(20)
    assert not thread.is_alive()
    assert finished.is_set()
    assert queue_size(name) == 0


# -- retries ---------------------------------------------------------------------


def test_retries_counted_right_when_delays_vary(names: Names) -> None:
    name = names.new("retry-vary")

    def retry(event: DomainEvent) -> None:
        raise Retry(0.05 * (event.retries + 1))

    recorder = Recorder(retry)
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["retryvary.x"], dead_letter=True, max_retries=3)
    publish_domain_event("retryvary.x", {"k": "v"})
    consume_until(subscriber, lambda: queue_size(f"{name}-dl") == 1, timeout=20)
    assert [event.retries for event in recorder.events] == [0, 1, 2, 3]
    ((method, properties, body),) = get_messages(f"{name}-dl")
    headers = properties.headers
    assert headers["x-retry-count"] == 3
    assert headers["x-exception-type"] == "domain_event_broker.subscribe.Retry"
    assert not any(key.startswith(("x-death", "x-first-death", "x-last-death")) for key in headers)
    assert json.loads(body)["data"] == {"k": "v"}
    assert method.routing_key == "retryvary.x"


def test_delay_queue_dead_letters_into_the_durable_retry_exchange(
    names: Names, channel: Any
) -> None:
    name = names.new("delayq")
    release = threading.Event()

    def retry_once(event: DomainEvent) -> None:
        if event.retries == 0:
            raise Retry(5)
        release.set()

    subscriber = Subscriber()
    subscriber.register(retry_once, name, ["delayq.x"], max_retries=1)
    publish_domain_event("delayq.x", {})
    thread = threading.Thread(target=subscriber.start_consuming, kwargs={"timeout": 30})
    thread.start()
    try:
        wait_for(lambda: queue_size(f"{name}-delay-5000-classic") == 1)
        # Passive-free check of the arguments: redeclaring succeeds only if
        # they are identical. 3.0.2's name-delay-5000 is left to 3.0.2.
        channel.queue_declare(
            queue=f"{name}-delay-5000-classic",
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-dead-letter-exchange": f"{name}-retry-durable",
                "x-message-ttl": 5000,
                "x-expires": 5000 + 3_600_000,
            },
        )
        assert release.wait(20)
        channel.queue_delete(f"{name}-delay-5000-classic")
    finally:
        subscriber.stop_consuming()
        thread.join(30)


def test_retry_past_max_without_dead_letter_is_discarded_with_error(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    name = names.new("retry-discard")

    def retry(event: DomainEvent) -> None:
        raise Retry(0.01)

    recorder = Recorder(retry)
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["retrydiscard.x"], max_retries=1)
    publish_domain_event("retrydiscard.x", {})
    with caplog.at_level(logging.INFO, logger="domain_event_broker"):
        consume_until(
            subscriber, lambda: recorder.count() == 2 and "discarded" in caplog.text, timeout=20
        )
    assert queue_size(name) == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "max_retries=1" in errors[0].getMessage()
    assert any(r.levelno == logging.INFO and "Retry 1/1" in r.getMessage() for r in caplog.records)


def test_retry_validates_delay() -> None:
    with pytest.raises(ValueError):
        Retry(-1)
    with pytest.raises(ValueError):
        Retry("soon")  # type: ignore[arg-type]


# -- dead letters ---------------------------------------------------------------


class PaymentDeclined(Exception):
    pass


def test_dead_letter_carries_why_and_keeps_everything(names: Names) -> None:
    name = names.new("dlheaders")

    def fail(event: DomainEvent) -> None:
        raise PaymentDeclined("card expired")

    subscriber = Subscriber()
    subscriber.register(fail, name, ["dlheaders.x"], dead_letter=True)
    body = json.dumps(
        {
            "routing_key": "dlheaders.x",
            "data": {"a": 1},
            "uuid_string": "u-1",
            "timestamp": 1.5,
            "domain_object_id": None,
        }
    ).encode()
    properties = pika.BasicProperties(
        delivery_mode=2,
        content_type="application/json",
        message_id="u-1",
        correlation_id="corr-7",
        app_id="billing",
        headers={"tenant": "acme", "x-death": [{"count": 1}]},
    )
    publish_raw("dlheaders.x", body, properties)
    before = time.time()
    consume_until(subscriber, lambda: queue_size(f"{name}-dl") == 1)
    ((method, got, got_body),) = get_messages(f"{name}-dl")
    assert got_body == body
    assert method.routing_key == "dlheaders.x"
    assert (
        got.delivery_mode,
        got.content_type,
        got.message_id,
        got.correlation_id,
        got.app_id,
    ) == (2, "application/json", "u-1", "corr-7", "billing")
    headers = got.headers
    assert headers["tenant"] == "acme"
    assert "x-death" not in headers
    assert headers["x-exception-type"] == f"{__name__}.PaymentDeclined"
    assert headers["x-exception-message"] == "card expired"
    assert "PaymentDeclined: card expired" in headers["x-exception-traceback"]
    assert headers["x-failed-handler"] == name
    assert before - 1 <= headers["x-failed-at"] <= time.time() + 1
    assert headers["x-retry-count"] == 0
    assert queue_size(name) == 0


def test_traceback_header_is_bounded(names: Names) -> None:
    name = names.new("dlbounded")

    def fail(event: DomainEvent) -> None:
        raise PaymentDeclined("x" * 100_000)

    subscriber = Subscriber()
    subscriber.register(fail, name, ["dlbounded.x"], dead_letter=True)
    publish_domain_event("dlbounded.x", {})
    consume_until(subscriber, lambda: queue_size(f"{name}-dl") == 1)
    ((_, properties, _),) = get_messages(f"{name}-dl")
    assert len(properties.headers["x-exception-traceback"]) <= 8_000
    assert len(properties.headers["x-exception-message"]) <= 1_000


def test_failure_without_dead_letter_is_logged_and_discarded(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    name = names.new("nodl")
    recorder = Recorder(lambda event: 1 / 0)
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["nodl.x"])
    publish_domain_event("nodl.x", {})
    publish_domain_event("nodl.x", {})
    with caplog.at_level(logging.ERROR, logger="domain_event_broker"):
        consume_until(subscriber, lambda: recorder.count() == 2 and queue_size(name) == 0)
    records = [r for r in caplog.records if "discarded" in r.getMessage()]
    assert len(records) == 2
    assert records[0].exc_info and records[0].exc_info[0] is ZeroDivisionError


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe not utf-8", b"iamnotvalidjson[]", b"[1, 2]", b"", b'{"data": {}}'],
    ids=["not-utf8", "not-json", "not-an-object", "empty", "no-routing-key"],
)
def test_malformed_messages_never_reach_a_handler(names: Names, body: bytes) -> None:
    name = names.new("malformed")
    recorder = Recorder()
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["malformed.x"], dead_letter=True)
    publish_raw("malformed.x", body)
    good = publish_domain_event("malformed.x", {"ok": True})
    consume_until(subscriber, lambda: recorder.count() == 1 and queue_size(f"{name}-dl") == 1)
    assert recorder.events == [good]
    ((_, properties, got),) = get_messages(f"{name}-dl")
    assert got == body
    assert (
        properties.headers["x-exception-type"] == "domain_event_broker.errors.MalformedEventError"
    )


def test_malformed_without_dead_letter_does_not_stop_the_worker(names: Names) -> None:
    name = names.new("malformed-nodl")
    recorder = Recorder()
    subscriber = Subscriber()
    subscriber.register(recorder, name, [f"{name}.#"])  # not "#": others share the broker
    publish_raw(f"{name}.y", b"iamnotvalidjson[]")
    publish_domain_event(f"{name}.y", {})
    consume_until(subscriber, lambda: recorder.count() == 1 and queue_size(name) == 0)


# -- worker processes: signals ----------------------------------------------------


def start_worker(name: str, key: str, state: Path, pause: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with (state / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.subscriber_worker", name, key, str(state), str(pause)],
            cwd=ROOT,
            env=env,
            stderr=stderr,
        )
    wait_for(lambda: (state / "ready").exists() or process.poll() is not None, timeout=30)
    assert process.poll() is None, "worker died while starting"
    return process


def test_sigterm_mid_handler_finishes_the_event_and_exits_0(names: Names, tmp_path: Path) -> None:
    name = names.new("sigterm")
    process = start_worker(name, "sigterm.x", tmp_path, pause=1.5)
    try:
        event = publish_domain_event("sigterm.x", {})
        wait_for(lambda: (tmp_path / f"started-{event.uuid_string}").exists(), timeout=20)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert (tmp_path / f"finished-{event.uuid_string}").exists()
    assert (tmp_path / "returned").exists()
    assert queue_size(name) == 0


def test_second_sigterm_stops_at_once_and_keeps_the_event(names: Names, tmp_path: Path) -> None:
    name = names.new("sigterm2")
    process = start_worker(name, "sigterm2.x", tmp_path, pause=60)
    try:
        event = publish_domain_event("sigterm2.x", {})
        wait_for(lambda: (tmp_path / f"started-{event.uuid_string}").exists(), timeout=20)
        process.send_signal(signal.SIGTERM)
        # The first signal was handled once the worker says so.
        wait_for(lambda: b"Received signal" in (tmp_path / "stderr.log").read_bytes(), timeout=20)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert not (tmp_path / f"finished-{event.uuid_string}").exists()
    # Not acknowledged: the event is back in the queue for the next worker.
    wait_for(lambda: queue_size(name) == 1)


def test_sigkill_mid_handler_redelivers_to_the_next_worker(names: Names, tmp_path: Path) -> None:
    name = names.new("sigkill")
    first = start_worker(name, "sigkill.x", tmp_path, pause=30)
    try:
        event = publish_domain_event("sigkill.x", {})
        wait_for(lambda: (tmp_path / f"started-{event.uuid_string}").exists(), timeout=20)
        first.kill()
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    (tmp_path / "ready").unlink()
    second = start_worker(name, "sigkill.x", tmp_path, pause=0)
    try:
        wait_for(
            lambda: (tmp_path / f"finished-{event.uuid_string}-redelivered").exists(), timeout=30
        )
        wait_for(lambda: queue_size(name) == 0)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()
    assert not (tmp_path / f"finished-{event.uuid_string}").exists()


def test_unique_event_ids_are_stable_through_retries(names: Names) -> None:
    name = names.new("uuid")

    def retry_once(event: DomainEvent) -> None:
        if event.retries == 0:
            raise Retry(0.01)

    recorder = Recorder(retry_once)
    subscriber = Subscriber()
    subscriber.register(recorder, name, ["uuid.x"], max_retries=2)
    event = publish_domain_event("uuid.x", {}, uuid_string=str(uuid.uuid4()))
    consume_until(subscriber, lambda: recorder.count() == 2 and queue_size(name) == 0)
    assert {e.uuid_string for e in recorder.events} == {event.uuid_string}
