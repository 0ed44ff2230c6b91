"""Dead letters made with raw pika, for the replay, CLI and command tests.

The topology is the one ``Subscriber.register(..., dead_letter=True)``
declares (as in 3.0.2); it is built here by hand so these tests do not depend
on the subscriber.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import pika

from domain_event_broker import DomainEvent

from .helpers import raw_connection


def routing_key_for(name: str) -> str:
    """A routing key only the handler ``name`` is bound to."""
    return f"{name}.happened"


def declare_handler(name: str, *, dead_letter: bool = True) -> None:
    """Declare handler ``name``'s queue, retry exchange and dead-letter route."""
    keys = [f"{name}.*"]
    connection = raw_connection()
    try:
        channel = connection.channel()
        arguments: dict[str, Any] = {}
        if dead_letter:
            channel.exchange_declare(f"{name}-dlx", exchange_type="topic")
            channel.queue_declare(f"{name}-dl", durable=True)
            for key in keys:
                channel.queue_bind(f"{name}-dl", f"{name}-dlx", key)
            arguments["x-dead-letter-exchange"] = f"{name}-dlx"
        channel.queue_declare(name, durable=True, arguments=arguments)
        channel.exchange_declare(f"{name}-retry", exchange_type="topic")
        for key in keys:
            channel.queue_bind(name, f"{name}-retry", key)
    finally:
        connection.close()


def make_event(name: str, data: Any = None) -> DomainEvent:
    return DomainEvent(routing_key=routing_key_for(name), data={"n": 0} if data is None else data)


def dead_letter_library_style(
    name: str,
    event: DomainEvent | None = None,
    *,
    body: bytes | None = None,
    headers: Mapping[str, Any] | None = None,
    retry_count: int = 2,
    exception: tuple[str, str] = ("app.errors.PaymentFailed", "card declined\nsecond line"),
    **properties: Any,
) -> DomainEvent:
    """Put one dead letter into ``name-dl`` the way the 4.0 Subscriber does:
    published to ``name-dlx`` with the exception headers."""
    event = event or make_event(name)
    all_headers = {
        "x-exception-type": exception[0],
        "x-exception-message": exception[1],
        "x-exception-traceback": "Traceback (most recent call last):\n  ...",
        "x-failed-handler": "app.handlers.charge",
        "x-failed-at": int(time.time()) - 90,
        "x-retry-count": retry_count,
        **(headers or {}),
    }
    props = {
        "delivery_mode": 2,
        "content_type": "application/json",
        "message_id": event.uuid_string,
        "timestamp": int(event.timestamp),
        **properties,
    }
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            f"{name}-dlx",
            event.routing_key,
            body if body is not None else event.to_json().encode(),
            pika.BasicProperties(headers=all_headers, **props),
            mandatory=True,
        )
    finally:
        connection.close()
    return event


def dead_letter_302_style(name: str, event: DomainEvent | None = None) -> DomainEvent:
    """Put one dead letter into ``name-dl`` the way 3.0.2 did: the handler's
    queue rejects it and RabbitMQ dead-letters it (``x-death``, no exception
    headers, no properties but persistence)."""
    event = event or make_event(name)
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            f"{name}-retry",
            event.routing_key,
            json.dumps(event.event_data).encode(),
            pika.BasicProperties(delivery_mode=2),
            mandatory=True,
        )
        deadline = time.monotonic() + 10
        while True:
            method, _, _ = channel.basic_get(name)
            if method is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the event never reached {name}")
            time.sleep(0.01)
        channel.basic_reject(method.delivery_tag, requeue=False)
    finally:
        connection.close()
    return event
