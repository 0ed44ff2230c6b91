"""Poison events against the real broker: each ends in ``-dl`` with a reason,
the events behind it are all handled, and the handler ran a bounded number of
times. Also what a worker does when a handler stops it or registers more."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from domain_event_broker import (
    DomainEvent,
    HandlerThreadError,
    Retry,
    Subscriber,
    publish_domain_event,
)
from domain_event_broker._amqp import names as _names
from domain_event_broker._subscribing import handler_threads as _handler_threads

from .conftest import Names
from .helpers import get_messages, queue_size, wait_for
from .test_subscriber import Recorder, consume_until, publish_raw


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


def _poison_then_good(
    names: Names, poison: Any, publish_poison: Any = None, name: str = "", **register: Any
) -> tuple[str, Recorder, list[Any]]:
    """A handler that fails with ``poison`` on events marked poison; 5 good ones follow."""
    name = name or names.new("poison")
    key = f"{name}.k"
    calls: list[Any] = []

    def handler(event: DomainEvent) -> None:
        if event.data.get("poison"):
            calls.append(event.uuid_string)
            poison(event)

    recorder = Recorder(handler)
    subscriber = Subscriber()
    subscriber.register(recorder, name, [key], dead_letter=True, **register)
    if publish_poison is None:
        publish_domain_event(key, {"poison": True})
    else:
        publish_poison(key)
    for index in range(5):
        publish_domain_event(key, {"n": index})
    consume_until(
        subscriber,
        # Distinct events: a channel the broker closed redelivers what it had.
        lambda: (
            len({e.uuid_string for e in recorder.events if "n" in e.data}) == 5
            and queue_size(f"{name}-dl") == 1
        ),
        timeout=30,
    )
    return name, recorder, calls


def _dead_letter_headers(name: str) -> dict[str, Any]:
    [(_, properties, _)] = get_messages(f"{name}-dl")
    return dict(properties.headers)


def test_a_deeply_nested_body_is_dead_lettered_and_the_worker_goes_on(names: Names) -> None:
    def publish(key: str) -> None:
        publish_raw(key, b"[" * 50_000 + b"]" * 50_000)

    name, _, calls = _poison_then_good(names, lambda event: None, publish)
    headers = _dead_letter_headers(name)
    assert headers["x-exception-type"] == "domain_event_broker.errors.MalformedEventError"
    assert "nested too deeply" in headers["x-exception-message"]
    assert calls == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Unprintable(), "<the exception's text could not be produced>"),
        (ValueError("lone \udc80 surrogate"), "lone \\udc80 surrogate"),
    ],
)
def test_exception_text_that_cannot_be_written_gets_a_placeholder(
    names: Names, error: Exception, expected: str
) -> None:
    def poison(event: DomainEvent) -> None:
        raise error

    name, _, calls = _poison_then_good(names, poison)
    headers = _dead_letter_headers(name)
    assert headers["x-exception-message"] == expected
    assert len(calls) == 1


@pytest.mark.parametrize("delay", [math.inf, math.nan, 10.0**12])
def test_an_impossible_retry_delay_is_dead_lettered(names: Names, delay: float) -> None:
    def poison(event: DomainEvent) -> None:
        raise Retry(delay)

    name, _, calls = _poison_then_good(names, poison, max_retries=5)
    headers = _dead_letter_headers(name)
    assert headers["x-exception-type"] == "ValueError"
    assert "Retry delay" in headers["x-exception-message"]
    assert len(calls) == 1


def test_a_delay_queue_the_broker_refuses_does_not_loop(names: Names, channel: Any) -> None:
    """A delay queue that exists with other arguments closes the channel once;
    the redelivered event is then dead-lettered with the broker's reason."""
    name = names.new("poison")
    # Not what the subscriber declares: PRECONDITION_FAILED closes its channel.
    delay_queue = _names.typed_delay_queue(name, 1000, "classic")
    channel.queue_declare(delay_queue, durable=True, arguments={"x-message-ttl": 5})

    def poison(event: DomainEvent) -> None:
        raise Retry(1)

    try:
        _, _, calls = _poison_then_good(names, poison, name=name, max_retries=5)
        headers = _dead_letter_headers(name)
    finally:
        channel.queue_delete(delay_queue)
    assert "refused the delay queue" in headers["x-exception-message"]
    assert len(calls) == 2  # once refused, once turned into a dead letter


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()])
def test_system_exit_in_a_handler_stops_and_is_raised(names: Names, error: BaseException) -> None:
    name = names.new("poison")
    key = f"{name}.k"

    def handler(event: DomainEvent) -> None:
        raise error

    subscriber = Subscriber()
    subscriber.register(handler, name, [key])
    publish_domain_event(key, {})
    started = time.monotonic()
    with pytest.raises(type(error)) as raised:
        subscriber.start_consuming(timeout=30)
    assert raised.value is error
    assert time.monotonic() - started < 20
    # The event was not acknowledged: it waits for the next worker.
    wait_for(lambda: queue_size(name) == 1)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_no_event_is_started_after_a_handler_raised_system_exit(
    names: Names, concurrency: int
) -> None:
    name = names.new("poison")
    key = f"{name}.k"
    calls: list[DomainEvent] = []

    def handler(event: DomainEvent) -> None:
        calls.append(event)
        if concurrency > 1:
            time.sleep(0.2)  # the others are started meanwhile; no fourth
        raise SystemExit(3)

    subscriber = Subscriber()
    subscriber.register(handler, name, [key], concurrency=concurrency)
    for _ in range(concurrency + 3):
        publish_domain_event(key, {})
    with pytest.raises(SystemExit):
        subscriber.start_consuming(timeout=30)
    assert len(calls) <= concurrency
    # Every event, the ones that raised included, waits for the next worker.
    wait_for(lambda: queue_size(name) == concurrency + 3)


def test_a_dead_handler_thread_ends_start_consuming(
    names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_dispatch(delivery: Any) -> Any:
        raise RuntimeError("a bug in the library")

    monkeypatch.setattr(_handler_threads, "dispatch", broken_dispatch)
    name = names.new("poison")
    subscriber = Subscriber()
    subscriber.register(lambda event: None, name, [f"{name}.k"])
    publish_domain_event(f"{name}.k", {})
    with pytest.raises(HandlerThreadError, match="a bug in the library") as raised:
        subscriber.start_consuming(timeout=30)
    assert isinstance(raised.value.__cause__, RuntimeError)
    wait_for(lambda: queue_size(name) == 1)  # redelivered later, not lost


def test_register_from_another_thread_while_consuming(names: Names) -> None:
    first, second = names.new("reg"), names.new("reg")
    recorder = Recorder()
    subscriber = Subscriber()
    subscriber.register(lambda event: None, first, [f"{first}.k"])
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            subscriber.start_consuming(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        wait_for(lambda: subscriber._loop is not None and subscriber._loop.consuming)
        subscriber.register(recorder, second, [f"{second}.k"])
        publish_domain_event(f"{second}.k", {"late": True})
        wait_for(lambda: recorder.count() == 1, timeout=15)
    finally:
        subscriber.stop_consuming()
        thread.join(30)
    assert not errors


def test_register_from_inside_a_handler(names: Names) -> None:
    first, second = names.new("reg"), names.new("reg")
    recorder = Recorder()
    subscriber = Subscriber()
    registered = threading.Event()

    def registers(event: DomainEvent) -> None:
        subscriber.register(recorder, second, [f"{second}.k"])
        registered.set()

    subscriber.register(registers, first, [f"{first}.k"])
    publish_domain_event(f"{first}.k", {})

    def second_consumed() -> bool:
        if not registered.is_set():
            return False
        if not recorder.count():
            publish_domain_event(f"{second}.k", {})
            wait_for(lambda: recorder.count() >= 1, timeout=10)
        return True

    consume_until(subscriber, second_consumed, timeout=30)
    assert recorder.count() == 1


def test_timeout_zero_returns_promptly_and_negative_is_refused(names: Names) -> None:
    name = names.new("timeout")
    subscriber = Subscriber()
    subscriber.register(lambda event: None, name, [f"{name}.#"])
    started = time.monotonic()
    subscriber.start_consuming(timeout=0)
    assert time.monotonic() - started < 60  # the upper bound only catches a 0 taken as "forever"
    for bad in (-1, math.nan, "1"):
        with pytest.raises(ValueError, match="timeout"):
            subscriber.start_consuming(timeout=bad)  # type: ignore[arg-type]


def test_a_failing_tick_callback_is_logged_and_consuming_goes_on(
    names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    name = names.new("tick")
    recorder = Recorder()
    ticks: list[float] = []

    def broken_probe(busy_for: float) -> None:
        ticks.append(busy_for)
        raise OSError("the health file's disk is full")

    subscriber = Subscriber()
    subscriber.register(recorder, name, [f"{name}.k"])
    subscriber.add_tick_callback(broken_probe)
    with pytest.raises(TypeError):
        subscriber.add_tick_callback("not callable")  # type: ignore[arg-type]
    for _ in range(3):
        publish_domain_event(f"{name}.k", {})
    consume_until(subscriber, lambda: recorder.count() == 3 and len(ticks) >= 2)
    assert all(busy >= 0 for busy in ticks)
    assert "A tick callback failed" in caplog.text
