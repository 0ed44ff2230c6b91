"""No copy this library makes keeps the message's ``expiration`` (issue 23,
item 2): a dead letter does not expire out of ``-dl``, a retry comes back
after its own delay, and replayed, parked and imported copies live as long
as their queue keeps them. The original value is kept in
``x-original-expiration``, as RabbitMQ's own dead-lettering does in
``x-death``."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from typing import Any

import pika
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_event_broker import DomainEvent, Retry, Subscriber
from domain_event_broker._core import headers as _headers
from domain_event_broker.replay import LEAVE, import_dead_letters, replay_all

from .conftest import Names
from .helpers import consumer_count, get_messages, queue_size, raw_connection, wait_for
from .test_subscriber import Recorder, consume_until

ORIGINAL = _headers.ORIGINAL_EXPIRATION


def _publish(exchange: str, routing_key: str, expiration: str, **data: Any) -> bytes:
    body = DomainEvent(routing_key, {"id": str(uuid.uuid4()), **data}).to_json().encode()
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(
            delivery_mode=2, expiration=expiration, headers={"tenant": "eu"}
        )
        channel.basic_publish(exchange, routing_key, body, properties)
    finally:
        connection.close()
    return body


def _assert_copy(properties: pika.BasicProperties, expiration: str) -> None:
    assert properties.expiration is None
    assert properties.headers[ORIGINAL] == expiration
    assert properties.headers["tenant"] == "eu"
    assert properties.delivery_mode == 2


def test_a_dead_letter_does_not_keep_the_expiration(names: Names) -> None:
    name = names.new("expiring")
    key = f"{name}.k"

    def fail(event: DomainEvent) -> None:
        raise RuntimeError("no")

    subscriber = Subscriber()
    subscriber.register(fail, name, [key], dead_letter=True)
    body = _publish("domain-events", key, "60000")
    consume_until(subscriber, lambda: queue_size(f"{name}-dl") == 1)
    [(_, properties, dead_body)] = get_messages(f"{name}-dl")
    assert dead_body == body
    _assert_copy(properties, "60000")


def test_a_retry_comes_back_after_its_delay_not_the_expiration(names: Names) -> None:
    name = names.new("expiring")
    key = f"{name}.k"
    seen: list[float] = []
    delay = 2.0

    def retry_once(event: DomainEvent) -> None:
        seen.append(time.monotonic())
        if len(seen) == 1:
            raise Retry(delay)

    subscriber = Subscriber()
    subscriber.register(Recorder(retry_once), name, [key], max_retries=1)
    published: list[bytes] = []

    def published_then_retried() -> bool:
        # Published once the worker consumes: the message is delivered at
        # once, before its 0.3 s run out in the queue.
        if not published and consumer_count(name) == 1:
            published.append(_publish("domain-events", key, "300"))
        return len(seen) == 2

    consume_until(subscriber, published_then_retried, timeout=30)
    # With the expiration kept, the copy left its 2 s delay queue after 0.3 s.
    assert seen[1] - seen[0] >= delay - 0.1, seen


def test_replayed_and_parked_copies_do_not_keep_the_expiration(names: Names) -> None:
    name = names.new("expiring")
    key = f"{name}.k"
    with Subscriber() as subscriber:
        subscriber.register(lambda event: None, name, [key], dead_letter=True)
    # Dead letters as 3.0.2 or another client may have left them: with expiration.
    kept = _publish("", f"{name}-dl", "60000", keep=True)
    replayed = _publish("", f"{name}-dl", "60000")

    def decide(body: bytes, **_: Any) -> str:
        return LEAVE if json.loads(body)["data"].get("keep") else "retry"

    replay_all(name, decide)
    wait_for(lambda: queue_size(name) == 1 and queue_size(f"{name}-dl") == 1)
    [(_, properties, body)] = get_messages(name)
    assert body == replayed
    _assert_copy(properties, "60000")
    [(_, properties, body)] = get_messages(f"{name}-dl")
    assert body == kept
    _assert_copy(properties, "60000")


@settings(max_examples=10, deadline=None)
@given(expiration=st.integers(0, 2**31 - 1).map(str))
def test_imported_copies_do_not_keep_the_expiration(broker_url: str, expiration: str) -> None:
    names = Names()
    try:
        name = names.new("expiring")
        with Subscriber() as subscriber:
            subscriber.register(lambda event: None, name, [f"{name}.k"], dead_letter=True)
        body = DomainEvent(f"{name}.k", {}).to_json().encode()
        line = {
            "routing_key": f"{name}.k",
            "body": base64.b64encode(body).decode(),
            "properties": {"delivery_mode": 2, "expiration": expiration},
            "headers": {"tenant": "eu"},
        }
        assert import_dead_letters(name, io.StringIO(json.dumps(line) + "\n")) == 1
        wait_for(lambda: queue_size(f"{name}-dl") == 1)
        [(_, properties, got)] = get_messages(f"{name}-dl")
        assert got == body
        _assert_copy(properties, expiration)
    finally:
        names.cleanup()


def test_a_view_of_a_dead_letter_keeps_what_it_has() -> None:
    properties = pika.BasicProperties(expiration="5", headers={"x-original-routing-key": "a.b"})
    view = _headers.copy_properties(properties, {}, keep_expiration=True)
    assert view.expiration == "5"
    copy = _headers.copy_properties(properties, {"k": 1})
    assert copy.expiration is None
    assert copy.headers == {"k": 1, ORIGINAL: "5"}
