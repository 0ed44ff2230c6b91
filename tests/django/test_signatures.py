"""publish_domain_event and its Django variants take the same event arguments."""

from __future__ import annotations

import inspect

from domain_event_broker import publish_domain_event
from domain_event_broker.django import publish_on_commit
from domain_event_broker.django.outbox import publish_via_outbox

#: What an event is made of, in publish_domain_event's order.
EVENT_ARGUMENTS = ("routing_key", "data", "domain_object_id", "uuid_string", "timestamp")


def test_publish_on_commit_takes_publish_domain_events_arguments_and_using() -> None:
    original = inspect.signature(publish_domain_event).parameters
    on_commit = inspect.signature(publish_on_commit).parameters
    assert list(original) == [*EVENT_ARGUMENTS, "connection_settings", "require_route"]
    assert list(on_commit) == [*original, "using"]
    # Name, kind (positional or keyword-only), default and annotation.
    assert [on_commit[name] for name in original] == list(original.values())


def test_the_outbox_takes_the_event_arguments_and_using() -> None:
    # It publishes nothing itself (the relay does, later): no broker settings.
    original = inspect.signature(publish_domain_event).parameters
    outbox = inspect.signature(publish_via_outbox).parameters
    assert list(outbox) == [*EVENT_ARGUMENTS, "using"]
    assert [outbox[name] for name in EVENT_ARGUMENTS] == [
        original[name] for name in EVENT_ARGUMENTS
    ]
    assert outbox["using"] == inspect.signature(publish_on_commit).parameters["using"]
