"""StubBroker: a real Subscriber's handlers, in memory, decided like the broker."""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain_event_broker import DomainEvent, Retry, Subscriber, publish_domain_event
from domain_event_broker._core.topic import topic_matches
from domain_event_broker.testing import StubBroker

from .conftest import Names
from .helpers import get_messages, raw_connection
from .test_subscriber import consume_until

#: Nothing listens here: anything that tried the network would fail.
NOWHERE = "amqp://guest:guest@127.0.0.1:1/%2F"


class Behaviour:
    """A handler whose behaviour depends on the event's data; records calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list[tuple[int, str]]] = defaultdict(list)

    def __call__(self, event: DomainEvent) -> None:
        plan = event.data["plan"]
        action = plan[min(event.retries, len(plan) - 1)]
        with self.lock:
            self.calls[event.data["id"]].append((event.retries, action))
        if action == "retry":
            raise Retry(0.05)
        if action == "fail":
            raise KeyError("planned failure")


def test_needs_no_broker_and_runs_the_real_policy() -> None:
    behaviour = Behaviour()
    with StubBroker() as broker:
        subscriber = Subscriber(NOWHERE, timeout=0.1)
        subscriber.register(behaviour, "welcome", ["user.*"], dead_letter=True, max_retries=2)
        publish_domain_event("user.registered", {"id": "a", "plan": ["ok"]})
        publish_domain_event("user.registered", {"id": "b", "plan": ["retry", "ok"]})
        publish_domain_event("user.registered", {"id": "c", "plan": ["retry"]})
        publish_domain_event("user.deleted", {"id": "d", "plan": ["fail"]})
        publish_domain_event("order.shipped", {"id": "e", "plan": ["ok"]})
        subscriber.start_consuming()
    assert [e.data["id"] for e in broker.handled("welcome")] == ["a", "b"]
    assert behaviour.calls["c"] == [(0, "retry"), (1, "retry"), (2, "retry")]
    assert sorted(e.data["id"] for e in broker.dead_letters("welcome")) == ["c", "d"]
    failed = {h.event.data["id"]: h for h in broker.history if h.outcome == "dead_lettered"}
    assert failed["d"].exception_type == "KeyError"
    assert "max_retries=2" in (failed["c"].exception_message or "")
    assert "e" not in behaviour.calls  # no binding matched
    retried = [h.delay for h in broker.history if h.outcome == "retried"]
    assert retried == [0.05, 0.05, 0.05]


def test_replay_puts_dead_letters_back_with_a_fresh_retry_count() -> None:
    calls: list[int] = []
    fixed = False

    def handler(event: DomainEvent) -> None:
        calls.append(event.retries)
        if not fixed:
            raise Retry(1)

    with StubBroker() as broker:
        subscriber = Subscriber()
        subscriber.register(handler, "h", ["#"], dead_letter=True, max_retries=1)
        publish_domain_event("a.b", {})
        broker.run()
        assert len(broker.dead_letters("h")) == 1
        fixed = True
        assert broker.replay("h") == 1
        broker.run()
    assert calls == [0, 1, 0]
    assert len(broker.handled("h")) == 1
    assert broker.dead_letters("h") == []


def test_a_failure_without_dead_letter_is_discarded() -> None:
    with StubBroker() as broker:
        Subscriber().register(Behaviour(), "h", ["#"])
        publish_domain_event("a", {"id": "x", "plan": ["fail"]})
        broker.run()
    [record] = broker.history
    assert record.outcome == "discarded"
    assert record.exception_type == "KeyError"


def test_system_exit_is_raised_and_the_event_kept() -> None:
    def handler(event: DomainEvent) -> None:
        raise SystemExit(2)

    with StubBroker() as broker:
        Subscriber().register(handler, "h", ["#"])
        publish_domain_event("a", {})
        with pytest.raises(SystemExit):
            broker.run()
    assert broker.history == []


def test_a_handler_that_retries_forever_is_stopped() -> None:
    def handler(event: DomainEvent) -> None:
        publish_domain_event("loop", {})

    with StubBroker(max_deliveries=50) as broker:
        Subscriber().register(handler, "h", ["loop"])
        publish_domain_event("loop", {})
        with pytest.raises(RuntimeError, match="50 deliveries"):
            broker.run()


def test_plugin_fixtures(stub_broker: StubBroker, captured_events: list[DomainEvent]) -> None:
    seen: list[DomainEvent] = []
    Subscriber().register(seen.append, "h", ["a.*"])
    publish_domain_event("a.b", {})
    stub_broker.run()
    assert len(seen) == 1
    assert [e.routing_key for e in captured_events] == ["a.b"]


# -- topic matching, against RabbitMQ's own ---------------------------------------------

TOPIC_CASES = [
    ("a.b", ["a.b", "a", "a.b.c", "b.a", ""]),
    ("a.*", ["a.b", "a", "a.b.c", "a."]),
    ("*.b", ["a.b", "b", ".b", "x.y.b"]),
    ("a.#", ["a", "a.b", "a.b.c", "b.a"]),
    ("#.c", ["c", "a.c", "a.b.c", "c.d"]),
    ("#", ["", "a", "a.b.c"]),
    ("*", ["", "a", "a.b"]),
    ("a.#.c", ["a.c", "a.b.c", "a.b.b.c", "a.b"]),
    ("#.#", ["", "a", "a.b"]),
    ("*.*.#", ["a", "a.b", "a.b.c"]),
    ("a.*.#.c", ["a.c", "a.b.c", "a.b.x.c", "a.b"]),
]


def test_topic_matching_agrees_with_rabbitmq(broker_url: str) -> None:
    connection = raw_connection()
    channel = connection.channel()
    exchange = f"test-topic-{uuid.uuid4().hex[:8]}"
    channel.exchange_declare(exchange, "topic")
    mismatches = []
    try:
        for binding, routing_keys in TOPIC_CASES:
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, exchange, binding)
            for key in routing_keys:
                channel.basic_publish(exchange, key, key.encode() or b"<empty>")
            received: set[str] = set()
            while True:
                method, _, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                received.add("" if body == b"<empty>" else body.decode())
            for key in routing_keys:
                if topic_matches(binding, key) != (key in received):
                    mismatches.append((binding, key, key in received))
            channel.queue_delete(queue)
    finally:
        channel.exchange_delete(exchange)
        connection.close()
    assert not mismatches


words = st.sampled_from(["a", "b", "c"])


@given(
    binding=st.lists(st.one_of(words, st.sampled_from(["*", "#"])), max_size=5),
    routing=st.lists(words, max_size=5),
)
def test_topic_matching_properties(binding: list[str], routing: list[str]) -> None:
    binding_key, routing_key = ".".join(binding), ".".join(routing)
    matched = topic_matches(binding_key, routing_key)
    if "*" not in binding and "#" not in binding:
        assert matched == (binding_key == routing_key)
    if binding and all(word == "#" for word in binding):
        assert matched
    if matched and "#" not in binding:
        assert len(binding) == len(routing)


# -- same outcomes in memory and on the broker ----------------------------------------

CASES: list[tuple[list[str], int, bool, list[tuple[str, list[str]]]]] = [
    # binding keys, max_retries, dead_letter, events (routing key, plan)
    (["user.*"], 0, True, [("user.a", ["ok"]), ("user.b", ["fail"]), ("other.a", ["ok"])]),
    (["#"], 2, True, [("x", ["retry", "ok"]), ("y.z", ["retry", "retry", "retry"])]),
    (["a.#", "b"], 1, False, [("a", ["fail"]), ("b", ["retry", "retry"]), ("a.b.c", ["ok"])]),
    (["*.c"], 3, True, [("b.c", ["retry", "fail"]), ("c", ["ok"])]),
]


def _run_on_stub(case: Any) -> tuple[dict[str, list[tuple[int, str]]], set[str]]:
    binding_keys, max_retries, dead_letter, events = case
    behaviour = Behaviour()
    with StubBroker() as broker:
        Subscriber().register(
            behaviour, "case", binding_keys, dead_letter=dead_letter, max_retries=max_retries
        )
        for index, (key, plan) in enumerate(events):
            publish_domain_event(key, {"id": str(index), "plan": plan})
        broker.run()
    dead = {e.data["id"] for e in broker.dead_letters("case")}
    return dict(behaviour.calls), dead


@pytest.mark.parametrize("case", CASES)
def test_same_outcomes_in_memory_and_on_the_broker(names: Names, case: Any) -> None:
    expected_calls, expected_dead = _run_on_stub(case)
    binding_keys, max_retries, dead_letter, events = case
    name = names.new("stubcase")
    prefix = name.replace("-", "")
    behaviour = Behaviour()
    subscriber = Subscriber()
    subscriber.register(
        behaviour,
        name,
        [f"{prefix}.{key}" for key in binding_keys],
        dead_letter=dead_letter,
        max_retries=max_retries,
    )
    for index, (key, plan) in enumerate(events):
        publish_domain_event(f"{prefix}.{key}", {"id": str(index), "plan": plan})
    total = sum(len(calls) for calls in expected_calls.values())

    def done() -> bool:
        with behaviour.lock:
            return sum(len(calls) for calls in behaviour.calls.values()) >= total

    consume_until(subscriber, done, timeout=30)
    dead = (
        {DomainEvent.from_json(body).data["id"] for _, _, body in get_messages(f"{name}-dl")}
        if dead_letter
        else set()
    )
    assert dict(behaviour.calls) == expected_calls
    assert dead == expected_dead
