"""StubBroker: a real Subscriber's handlers, in memory, decided like the broker."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain_event_broker import (
    BatchPublishError,
    DomainEvent,
    Publisher,
    Retry,
    Subscriber,
    UnroutableError,
    configure,
    publish_domain_event,
)
from domain_event_broker._core.topic import topic_matches
from domain_event_broker.testing import StubBroker, capture_events

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


# -- as a broker does: stopping, require_route, several Subscribers (issue 23, item 15) ----


def test_stop_consuming_in_a_handler_leaves_the_rest_queued() -> None:
    seen: list[int] = []
    with StubBroker() as broker:
        subscriber = Subscriber()

        def handler(event: DomainEvent) -> None:
            seen.append(event.data["i"])
            subscriber.stop_consuming()

        subscriber.register(handler, "h", ["a"])
        for index in range(3):
            publish_domain_event("a", {"i": index})
        subscriber.start_consuming()
        assert seen == [0]
        assert [e.data["i"] for e in broker.queued("h")] == [1, 2]
        subscriber.start_consuming()  # a stop asked before does not carry over
        assert seen == [0, 1]
        assert broker.run() == 1  # run() is not stopped by stop_consuming()
    assert seen == [0, 1, 2]
    assert broker.queued("h") == []


def test_start_consuming_stops_at_its_timeout() -> None:
    seen: list[int] = []

    def slow(event: DomainEvent) -> None:
        seen.append(event.data["i"])
        time.sleep(0.3)

    with StubBroker() as broker:
        subscriber = Subscriber()
        subscriber.register(slow, "h", ["a"])
        for index in range(3):
            publish_domain_event("a", {"i": index})
        subscriber.start_consuming(timeout=0)
        assert seen == []
        subscriber.start_consuming(timeout=0.1)  # the first runs past it; no other starts
        assert seen == [0]
        assert len(broker.queued("h")) == 2


def test_require_route_raises_when_no_handler_is_bound() -> None:
    with StubBroker() as broker, capture_events() as captured:
        Subscriber().register(lambda event: None, "h", ["bound.*"])
        with pytest.raises(UnroutableError, match=r"'nobody\.listens'"):
            publish_domain_event("nobody.listens", {}, require_route=True)
        with pytest.raises(UnroutableError):
            Publisher(NOWHERE).publish_event(DomainEvent("nobody.listens", {}), require_route=True)
        configure(require_route=True)
        with pytest.raises(UnroutableError):
            publish_domain_event("nobody.listens", {})
        publish_domain_event("bound.one", {})
        publish_domain_event("nobody.listens", {}, require_route=False)
    assert [e.routing_key for e in broker.published] == ["bound.one", "nobody.listens"]
    assert [e.routing_key for e in captured] == ["bound.one", "nobody.listens"]
    assert len(broker.queued("h")) == 1


def test_publish_many_with_require_route_fails_the_unbound_events_only() -> None:
    events = [DomainEvent("bound.a", {}), DomainEvent("unbound", {}), DomainEvent("bound.b", {})]
    with StubBroker() as broker:
        Subscriber().register(lambda event: None, "h", ["bound.*"])
        with pytest.raises(BatchPublishError, match="1 of 3") as caught:
            Publisher(NOWHERE).publish_many(events, require_route=True)
        assert [(e, type(err)) for e, err in caught.value.failed] == [(events[1], UnroutableError)]
        assert caught.value.confirmed == [events[0], events[2]]
        assert isinstance(caught.value.__cause__, UnroutableError)
        assert broker.queued("h") == [events[0], events[2]]


def test_each_subscriber_runs_its_own_handlers() -> None:
    seen: list[str] = []
    with StubBroker() as broker:
        first, second = Subscriber(), Subscriber()
        first.register(lambda e: seen.append("first"), "one", ["x"])
        second.register(lambda e: seen.append("second"), "two", ["x"])
        publish_domain_event("x", {})
        first.start_consuming()
        assert seen == ["first"]
        assert len(broker.queued("two")) == 1
        second.start_consuming()
    assert seen == ["first", "second"]


def test_subscribers_registering_one_name_share_its_queue() -> None:
    seen: list[tuple[str, int]] = []
    with StubBroker() as broker:
        first, second = Subscriber(), Subscriber()
        first.register(lambda e: seen.append(("first", e.data["i"])), "h", ["x"])
        second.register(lambda e: seen.append(("second", e.data["i"])), "h", ["y"])
        for index, key in enumerate(["x", "y", "x", "y"]):
            publish_domain_event(key, {"i": index})  # the queue is bound with x and y
        first.start_consuming()
        assert seen == [("first", 0), ("first", 1), ("first", 2), ("first", 3)]
        for index in range(4, 6):
            publish_domain_event("x", {"i": index})
        broker.run()  # the consumers take turns
    assert sorted(who for who, index in seen[4:]) == ["first", "second"]


@given(
    bindings=st.lists(
        st.lists(st.one_of(words, st.sampled_from(["*", "#"])), min_size=1, max_size=4),
        max_size=3,
    ),
    routing=st.lists(words, min_size=1, max_size=4),
)
def test_require_route_raises_exactly_when_no_binding_matches(
    bindings: list[list[str]], routing: list[str]
) -> None:
    binding_keys = [".".join(words) for words in bindings]
    routing_key = ".".join(routing)
    routable = any(topic_matches(key, routing_key) for key in binding_keys)
    with StubBroker() as broker:
        if binding_keys:
            Subscriber(NOWHERE).register(lambda event: None, "h", binding_keys)
        try:
            publish_domain_event(routing_key, {}, require_route=True)
        except UnroutableError:
            assert not routable
            assert broker.published == []
        else:
            assert routable
            assert len(broker.queued("h")) == 1


def test_events_reach_the_subscribers_of_their_exchange_only() -> None:
    seen: list[tuple[str, str]] = []
    with StubBroker() as broker:
        Subscriber(exchange="other").register(
            lambda e: seen.append(("other", e.routing_key)), "o", ["#"]
        )
        Subscriber().register(lambda e: seen.append(("default", e.routing_key)), "d", ["#"])
        publish_domain_event("a", {})
        Publisher(NOWHERE, exchange="other").publish_event(DomainEvent("b", {}))
        Publisher(NOWHERE, exchange="other").publish_many([DomainEvent("c", {})])
        with pytest.raises(UnroutableError):
            Publisher(NOWHERE, exchange="third").publish_event(
                DomainEvent("d", {}), require_route=True
            )
        broker.run()
    assert sorted(seen) == [("default", "a"), ("other", "b"), ("other", "c")]
