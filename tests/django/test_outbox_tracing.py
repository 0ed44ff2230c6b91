"""The outbox keeps the trace context of the request that wrote the row, and
the relay's publish continues that trace (issue 13)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from django.db import transaction

from domain_event_broker.django.models import OutboxEvent
from domain_event_broker.django.outbox import publish_via_outbox
from domain_event_broker.django.relay import OutboxRelay

from ..helpers import get_messages, wait_for
from ..otel_support import otel, tracing_off
from .support import EventQueue


@pytest.fixture(autouse=True)
def _tracing_off_after() -> Iterator[None]:
    yield
    tracing_off()


def test_the_relays_publish_continues_the_request_that_wrote_the_row(
    db_alias: str, event_queue: EventQueue
) -> None:
    tel = otel()
    with (
        tel.tracer.start_as_current_span("POST /users") as request,
        transaction.atomic(using=db_alias),
    ):
        event = publish_via_outbox(event_queue.key(), {"id": 7}, using=db_alias)
    untraced = publish_via_outbox(event_queue.key(), {"id": 8}, using=db_alias)

    rows = dict(OutboxEvent.objects.using(db_alias).values_list("uuid_string", "trace_context"))
    stored = json.loads(rows[event.uuid_string])
    assert stored["traceparent"].split("-")[1] == format(
        request.get_span_context().trace_id, "032x"
    )
    assert rows[untraced.uuid_string] == ""  # no active span: nothing stored

    tel.spans.clear()
    with OutboxRelay(using=db_alias) as relay:
        assert relay.run(once=True) == 2

    traced, plain = tel.finished("publish ")
    assert traced.context.trace_id == request.get_span_context().trace_id
    assert traced.parent is not None
    assert traced.parent.span_id == request.get_span_context().span_id
    assert plain.parent is None  # a new trace for the row written outside a span
    messages: list = []

    def both_arrived() -> bool:
        messages.extend(get_messages(event_queue.name))
        return len(messages) >= 2

    wait_for(both_arrived, message="two events")
    headers = {json.loads(body)["uuid_string"]: props.headers for _, props, body in messages}
    assert headers[event.uuid_string]["traceparent"].split("-")[2] == format(
        traced.context.span_id, "016x"
    )
