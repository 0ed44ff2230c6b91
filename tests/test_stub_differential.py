"""StubBroker against RabbitMQ: the same scenarios, the same outcomes.

Each scenario is a row: a function that drives a :class:`Backend` (publish,
register, consume, look at what is left) and returns what happened, and the
outcome the real broker gives. Every row runs on both backends, the stub and
RabbitMQ (the test broker, ``DOMAIN_EVENT_BROKER``), and both must give that
outcome. To cover another case, add a function and a row to ``SCENARIOS``.

Routing keys and binding keys go through :meth:`Backend.key`, which puts them
under a prefix of their own, so that rows do not see each other's events on a
shared broker (``#`` becomes ``<prefix>.#``); the stub gets the same keys.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from domain_event_broker import (
    BatchPublishError,
    DomainEvent,
    Publisher,
    Retry,
    Subscriber,
    publish_domain_event,
    replay_all,
)
from domain_event_broker.testing import StubBroker

from .helpers import get_messages, queue_size, wait_for

#: How long a scenario may wait for the real broker.
DEADLINE = 30.0


class Calls:
    """Records handler calls, per handler, as ``(event id, retries)``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_handler: dict[str, list[tuple[str, int]]] = {}

    def record(self, handler: str, event: DomainEvent) -> None:
        with self.lock:
            self.by_handler.setdefault(handler, []).append((str(event.data["id"]), event.retries))

    def ids(self, handler: str) -> list[str]:
        """The ids ``handler`` was called with, sorted (order is not compared)."""
        with self.lock:
            return sorted(event_id for event_id, _ in self.by_handler.get(handler, []))

    def count(self, handler: str | None = None) -> int:
        with self.lock:
            if handler is None:
                return sum(len(calls) for calls in self.by_handler.values())
            return len(self.by_handler.get(handler, []))


class Backend:
    """What a scenario drives: the stub or RabbitMQ, behind one interface."""

    kind = ""

    def __init__(self) -> None:
        self.prefix = f"diff{uuid.uuid4().hex[:8]}"
        self.subscribers: list[Subscriber] = []

    def key(self, key: str) -> str:
        """``key`` (routing or binding) under this scenario's own prefix."""
        return f"{self.prefix}.{key}"

    def name(self) -> str:
        """A fresh handler name."""
        return f"diff-{uuid.uuid4().hex[:10]}"

    def exchange(self) -> str:
        """A fresh exchange name (besides the default ``domain-events``)."""
        return f"diff-exchange-{uuid.uuid4().hex[:10]}"

    def subscriber(self, **options: Any) -> Subscriber:
        subscriber = Subscriber(**options)
        self.subscribers.append(subscriber)
        return subscriber

    def consume(
        self,
        subscriber: Subscriber,
        until: Callable[[], bool] | None = None,
        timeout: float = DEADLINE,
    ) -> str | None:
        """Run ``subscriber.start_consuming(timeout)``; what it raised, by class name.

        ``until``: on RabbitMQ, stop once it holds (the stub returns by itself
        when nothing is left); ``None``: the scenario stops it itself.
        """
        raise NotImplementedError

    def queued(self, name: str) -> int:
        """How many events wait in handler ``name``'s queue."""
        raise NotImplementedError

    def dead_letters(self, name: str) -> list[tuple[str, str | None]]:
        """``(event id, x-exception-type)`` of ``name``'s dead letters, sorted."""
        raise NotImplementedError

    def dead_letters_waiting(self, name: str) -> int:
        """How many dead letters wait in ``name``'s dead-letter queue (left there)."""
        raise NotImplementedError

    def replay(self, name: str) -> int:
        """Put ``name``'s dead letters back into its queue; how many are left
        in the dead-letter queue (``replay_all``'s answer)."""
        raise NotImplementedError

    def close(self) -> None:
        for subscriber in self.subscribers:
            subscriber.close()


class StubBackend(Backend):
    kind = "stub"

    def __init__(self, broker: StubBroker) -> None:
        super().__init__()
        self.broker = broker

    def consume(
        self,
        subscriber: Subscriber,
        until: Callable[[], bool] | None = None,
        timeout: float = DEADLINE,
    ) -> str | None:
        try:
            subscriber.start_consuming(timeout=timeout)
        except BaseException as exc:
            return type(exc).__name__
        return None

    def queued(self, name: str) -> int:
        return len(self.broker.queued(name))

    def dead_letters_waiting(self, name: str) -> int:
        return len(self.broker.dead_letters(name))

    def replay(self, name: str) -> int:
        self.broker.replay(name)
        return len(self.broker.dead_letters(name))

    def dead_letters(self, name: str) -> list[tuple[str, str | None]]:
        return sorted(
            (str(event.data["id"]), record.exception_type)
            for record in self.broker.history
            if record.handler == name and record.outcome == "dead_lettered"
            for event in [record.event]
            if event is not None
        )


class RabbitBackend(Backend):
    kind = "rabbitmq"

    def __init__(self, names: Any) -> None:
        super().__init__()
        self.names = names

    def name(self) -> str:
        return str(self.names.new("diff"))

    def exchange(self) -> str:
        exchange = super().exchange()
        self.names.exchanges.append(exchange)
        return exchange

    def consume(
        self,
        subscriber: Subscriber,
        until: Callable[[], bool] | None = None,
        timeout: float = DEADLINE,
    ) -> str | None:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                subscriber.start_consuming(timeout=timeout)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            if until is not None:
                wait_for(until, timeout=DEADLINE, message="the scenario's end on RabbitMQ")
                subscriber.stop_consuming()
        finally:
            thread.join(DEADLINE + timeout)
        assert not thread.is_alive(), "start_consuming() did not return"
        return type(errors[0]).__name__ if errors else None

    def queued(self, name: str) -> int:
        # Events returned by a closing consumer are ready again at once; poll
        # briefly in case the broker is still requeueing them.
        deadline = time.monotonic() + 2.0
        size = queue_size(name) or 0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = queue_size(name) or 0
            if again == size:
                break
            size = again
        return size

    def dead_letters_waiting(self, name: str) -> int:
        return self.queued(f"{name}-dl")

    def replay(self, name: str) -> int:
        return replay_all(name)

    def dead_letters(self, name: str) -> list[tuple[str, str | None]]:
        found = []
        for _, properties, body in get_messages(f"{name}-dl"):
            headers = properties.headers or {}
            exception_type = headers.get("x-exception-type")
            if isinstance(exception_type, bytes):
                exception_type = exception_type.decode()
            found.append((str(DomainEvent.from_json(body).data["id"]), exception_type))
        return sorted(found)


# -- scenarios ------------------------------------------------------------------------------


def stop_consuming_inside_a_handler(backend: Backend) -> dict[str, Any]:
    """A handler calls stop_consuming(): that event is handled, the rest wait."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()

    def handler(event: DomainEvent) -> None:
        calls.record(name, event)
        subscriber.stop_consuming()

    subscriber.register(handler, name, [backend.key("a")])
    for index in range(3):
        publish_domain_event(backend.key("a"), {"id": index})
    error = backend.consume(subscriber)
    return {"error": error, "handled": calls.count(name), "queued": backend.queued(name)}


def require_route_with_nothing_bound(backend: Backend) -> dict[str, Any]:
    """require_route=True raises UnroutableError when no handler is bound."""
    name = backend.name()
    backend.subscriber().register(lambda event: None, name, [backend.key("bound")])
    outcome: dict[str, Any] = {}
    for label, key in [("bound", "bound"), ("unbound", "nobody.listens")]:
        try:
            publish_domain_event(backend.key(key), {"id": label}, require_route=True)
            outcome[label] = None
        except Exception as exc:
            outcome[label] = type(exc).__name__
    with Publisher() as publisher:
        try:
            publisher.publish_event(
                DomainEvent(backend.key("nobody.listens"), {"id": "x"}), require_route=True
            )
            outcome["publish_event"] = None
        except Exception as exc:
            outcome["publish_event"] = type(exc).__name__
    outcome["queued"] = backend.queued(name)
    return outcome


def publish_many_with_require_route(backend: Backend) -> dict[str, Any]:
    """publish_many(require_route=True): the unbound event fails, the others go."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()
    subscriber.register(lambda e: calls.record(name, e), name, [backend.key("bound.*")])
    events = [
        DomainEvent(backend.key("bound.one"), {"id": "1"}),
        DomainEvent(backend.key("unbound"), {"id": "2"}),
        DomainEvent(backend.key("bound.two"), {"id": "3"}),
    ]
    outcome: dict[str, Any] = {}
    with Publisher() as publisher:
        try:
            publisher.publish_many(events, require_route=True)
            outcome["error"] = None
        except BatchPublishError as exc:
            outcome["error"] = "BatchPublishError"
            outcome["failed"] = [(e.data["id"], type(error).__name__) for e, error in exc.failed]
            outcome["confirmed"] = [e.data["id"] for e in exc.confirmed]
        publisher.publish_many([DomainEvent(backend.key("bound.three"), {"id": "4"})])
    backend.consume(subscriber, until=lambda: calls.count() >= 3)
    outcome["handled"] = calls.ids(name)
    return outcome


def two_subscribers(backend: Backend) -> dict[str, Any]:
    """s1.start_consuming() runs s1's handlers only; s2's events wait."""
    calls = Calls()
    first, second = backend.subscriber(), backend.subscriber()
    one, two = backend.name(), backend.name()
    first.register(lambda e: calls.record(one, e), one, [backend.key("x")])
    second.register(lambda e: calls.record(two, e), two, [backend.key("x")])
    for index in range(2):
        publish_domain_event(backend.key("x"), {"id": index})
    error = backend.consume(first, until=lambda: calls.count(one) >= 2)
    return {
        "error": error,
        "first": calls.ids(one),
        "second": calls.ids(two),
        "second_queued": backend.queued(two),
    }


def one_handler_name_in_two_subscribers(backend: Backend) -> dict[str, Any]:
    """Two subscribers register the same name: they share its queue."""
    calls = Calls()
    first, second = backend.subscriber(), backend.subscriber()
    name = backend.name()
    first.register(lambda e: calls.record("first", e), name, [backend.key("x")])
    second.register(lambda e: calls.record("second", e), name, [backend.key("x")])
    for index in range(3):
        publish_domain_event(backend.key("x"), {"id": index})
    error = backend.consume(first, until=lambda: calls.count("first") >= 3)
    return {"error": error, "first": calls.ids("first"), "second": calls.ids("second")}


def start_consuming_with_timeout_zero(backend: Backend) -> dict[str, Any]:
    """timeout=0 returns promptly: nothing is handled, everything waits."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()
    subscriber.register(lambda e: calls.record(name, e), name, [backend.key("t")])
    for index in range(3):
        publish_domain_event(backend.key("t"), {"id": index})
    error = backend.consume(subscriber, timeout=0)
    return {"error": error, "handled": calls.count(), "queued": backend.queued(name)}


def timeout_during_a_slow_handler(backend: Backend) -> dict[str, Any]:
    """The deadline passes while a handler runs: it finishes; no other starts."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()

    def slow(event: DomainEvent) -> None:
        calls.record(name, event)
        time.sleep(3.5)  # past the deadline, wherever it started

    subscriber.register(slow, name, [backend.key("t")])
    for index in range(3):
        publish_domain_event(backend.key("t"), {"id": index})
    error = backend.consume(subscriber, timeout=3.0)
    return {"error": error, "handled": calls.count(), "queued": backend.queued(name)}


def system_exit_in_a_handler(backend: Backend) -> dict[str, Any]:
    """SystemExit stops consuming, is re-raised, and the event is kept."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()

    def handler(event: DomainEvent) -> None:
        calls.record(name, event)
        raise SystemExit(3)

    subscriber.register(handler, name, [backend.key("s")])
    for index in range(2):
        publish_domain_event(backend.key("s"), {"id": index})
    error = backend.consume(subscriber)
    return {"error": error, "handled": calls.count(), "queued": backend.queued(name)}


def retries_then_dead_letter(backend: Backend) -> dict[str, Any]:
    """Retry up to max_retries, then dead-letter; failures dead-letter at once."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()

    def handler(event: DomainEvent) -> None:
        calls.record(name, event)
        if event.data["id"] == "retry":
            raise Retry(0.05)
        if event.data["id"] == "fail":
            raise KeyError("planned")

    subscriber.register(handler, name, [backend.key("r.#")], dead_letter=True, max_retries=2)
    for event_id in ["retry", "fail", "ok"]:
        publish_domain_event(backend.key("r.x"), {"id": event_id})
    backend.consume(subscriber, until=lambda: calls.count() >= 5)
    with calls.lock:
        retries = sorted(r for i, r in calls.by_handler.get(name, []) if i == "retry")
    return {"calls": calls.ids(name), "retries": retries, "dead": backend.dead_letters(name)}


def failure_without_dead_letter(backend: Backend) -> dict[str, Any]:
    """A failing handler without dead_letter: the event is acknowledged and gone."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()

    def handler(event: DomainEvent) -> None:
        calls.record(name, event)
        raise ValueError("planned")

    subscriber.register(handler, name, [backend.key("f")], max_retries=3)
    publish_domain_event(backend.key("f"), {"id": "1"})
    publish_domain_event(backend.key("f"), {"id": "2"})
    backend.consume(subscriber, until=lambda: calls.count() >= 2)
    return {"calls": calls.ids(name), "queued": backend.queued(name)}


ROUTING_KEYS = ["a", "a.b", "a.b.c", "b.a", "b", "a.c", "x.b.c"]


def binding_patterns(backend: Backend) -> dict[str, Any]:
    """``*`` is one word, ``#`` zero or more; several keys on one handler."""
    calls = Calls()
    subscriber = backend.subscriber()
    patterns = {"star": ["a.*"], "hash": ["a.#"], "mixed": ["*.b.#", "b"], "tail": ["#.c"]}
    names = {label: backend.name() for label in patterns}
    for label, keys in patterns.items():
        subscriber.register(
            lambda e, label=label: calls.record(label, e),
            names[label],
            [backend.key(key) for key in keys],
        )
    for key in ROUTING_KEYS:
        publish_domain_event(backend.key(key), {"id": key})
    # Expected calls: star 2, hash 4, mixed 4, tail 3.
    backend.consume(subscriber, until=lambda: calls.count() >= 13)
    return {label: calls.ids(label) for label in patterns}


def unknown_routing_key(backend: Backend) -> dict[str, Any]:
    """An event nobody is bound for is dropped silently (no require_route)."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()
    subscriber.register(lambda e: calls.record(name, e), name, [backend.key("known")])
    publish_domain_event(backend.key("unknown"), {"id": "lost"})
    publish_domain_event(backend.key("known"), {"id": "kept"})
    backend.consume(subscriber, until=lambda: calls.count() >= 1)
    return {"handled": calls.ids(name), "queued": backend.queued(name)}


def publishing_from_a_handler(backend: Backend) -> dict[str, Any]:
    """Events a handler publishes reach other handlers (and itself) in the same run."""
    calls = Calls()
    subscriber = backend.subscriber()
    first, second = backend.name(), backend.name()

    def relay(event: DomainEvent) -> None:
        calls.record(first, event)
        if event.data["id"] < 3:
            publish_domain_event(backend.key("hop"), {"id": event.data["id"] + 1})
        publish_domain_event(backend.key("done"), {"id": event.data["id"]})

    subscriber.register(relay, first, [backend.key("hop")])
    subscriber.register(lambda e: calls.record(second, e), second, [backend.key("done")])
    publish_domain_event(backend.key("hop"), {"id": 0})
    backend.consume(subscriber, until=lambda: calls.count() >= 8)
    return {"first": calls.ids(first), "second": calls.ids(second)}


def concurrency(backend: Backend) -> dict[str, Any]:
    """concurrency=3: every event handled once (order not compared)."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()
    subscriber.register(lambda e: calls.record(name, e), name, [backend.key("c")], concurrency=3)
    with Publisher() as publisher:
        publisher.publish_many(
            [DomainEvent(backend.key("c"), {"id": str(index)}) for index in range(9)]
        )
    backend.consume(subscriber, until=lambda: calls.count() >= 9)
    return {"handled": calls.ids(name), "queued": backend.queued(name)}


def another_exchange(backend: Backend) -> dict[str, Any]:
    """A Subscriber on another exchange gets the events published there only."""
    calls = Calls()
    exchange = backend.exchange()
    elsewhere = backend.subscriber(exchange=exchange)
    here = backend.subscriber()
    other, default = backend.name(), backend.name()
    elsewhere.register(lambda e: calls.record(other, e), other, [backend.key("#")])
    here.register(lambda e: calls.record(default, e), default, [backend.key("#")])
    publish_domain_event(backend.key("a"), {"id": "default"})
    with Publisher(exchange=exchange) as publisher:
        publisher.publish_event(DomainEvent(backend.key("a"), {"id": "other"}))
        publisher.publish_many([DomainEvent(backend.key("b"), {"id": "other-many"})])
    backend.consume(elsewhere, until=lambda: calls.count(other) >= 2)
    backend.consume(here, until=lambda: calls.count(default) >= 1)
    return {"other": calls.ids(other), "default": calls.ids(default)}


def replaying_dead_letters(backend: Backend) -> dict[str, Any]:
    """Replayed dead letters come back with a fresh retry count."""
    calls = Calls()
    subscriber = backend.subscriber()
    name = backend.name()
    fixed = threading.Event()

    def handler(event: DomainEvent) -> None:
        calls.record(name, event)
        if not fixed.is_set():
            raise Retry(0.05)

    subscriber.register(handler, name, [backend.key("p")], dead_letter=True, max_retries=1)
    publish_domain_event(backend.key("p"), {"id": "x"})
    backend.consume(subscriber, until=lambda: calls.count() >= 2)
    dead_before = backend.dead_letters_waiting(name)
    fixed.set()
    left = backend.replay(name)
    backend.consume(subscriber, until=lambda: calls.count() >= 3)
    with calls.lock:
        retries = [r for _, r in calls.by_handler[name]]
    return {"dead_before": dead_before, "left": left, "retries": retries}


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Backend], dict[str, Any]]
    #: What RabbitMQ gives, and so what the stub must give.
    expected: dict[str, Any]

    def __str__(self) -> str:
        return self.run.__name__


SCENARIOS = [
    Scenario(stop_consuming_inside_a_handler, {"error": None, "handled": 1, "queued": 2}),
    Scenario(
        require_route_with_nothing_bound,
        {
            "bound": None,
            "unbound": "UnroutableError",
            "publish_event": "UnroutableError",
            "queued": 1,
        },
    ),
    Scenario(
        publish_many_with_require_route,
        {
            "error": "BatchPublishError",
            "failed": [("2", "UnroutableError")],
            "confirmed": ["1", "3"],
            "handled": ["1", "3", "4"],
        },
    ),
    Scenario(
        two_subscribers,
        {"error": None, "first": ["0", "1"], "second": [], "second_queued": 2},
    ),
    Scenario(
        one_handler_name_in_two_subscribers,
        {"error": None, "first": ["0", "1", "2"], "second": []},
    ),
    Scenario(start_consuming_with_timeout_zero, {"error": None, "handled": 0, "queued": 3}),
    Scenario(timeout_during_a_slow_handler, {"error": None, "handled": 1, "queued": 2}),
    Scenario(system_exit_in_a_handler, {"error": "SystemExit", "handled": 1, "queued": 2}),
    Scenario(
        retries_then_dead_letter,
        {
            "calls": ["fail", "ok", "retry", "retry", "retry"],
            "retries": [0, 1, 2],
            "dead": [("fail", "KeyError"), ("retry", "domain_event_broker.subscribe.Retry")],
        },
    ),
    Scenario(failure_without_dead_letter, {"calls": ["1", "2"], "queued": 0}),
    Scenario(
        binding_patterns,
        {
            "star": ["a.b", "a.c"],
            "hash": ["a", "a.b", "a.b.c", "a.c"],
            "mixed": ["a.b", "a.b.c", "b", "x.b.c"],
            "tail": ["a.b.c", "a.c", "x.b.c"],
        },
    ),
    Scenario(unknown_routing_key, {"handled": ["kept"], "queued": 0}),
    Scenario(
        publishing_from_a_handler,
        {"first": ["0", "1", "2", "3"], "second": ["0", "1", "2", "3"]},
    ),
    Scenario(concurrency, {"handled": [str(index) for index in range(9)], "queued": 0}),
    Scenario(another_exchange, {"other": ["other", "other-many"], "default": ["default"]}),
    Scenario(replaying_dead_letters, {"dead_before": 1, "left": 0, "retries": [0, 1, 0]}),
]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    chosen: Backend
    if request.param == "stub":
        with StubBroker() as broker:
            chosen = StubBackend(broker)
            try:
                yield chosen
            finally:
                chosen.close()
    else:
        chosen = RabbitBackend(request.getfixturevalue("names"))
        try:
            yield chosen
        finally:
            chosen.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "backend",
    [pytest.param("stub"), pytest.param("rabbitmq", marks=pytest.mark.broker)],
    indirect=True,
)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_same_outcome_on_the_stub_and_on_rabbitmq(backend: Backend, scenario: Scenario) -> None:
    assert scenario.run(backend) == scenario.expected
