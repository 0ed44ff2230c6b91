"""The transactional outbox: events written with the caller's data, relayed later.

:func:`publish_via_outbox` inserts the event into the
:class:`~domain_event_broker.django.models.OutboxEvent` table inside the
caller's transaction: it exists exactly when the caller's data does. The relay
(``manage.py relay_domain_events``, or :class:`~.relay.OutboxRelay`) publishes
pending rows with publisher confirms and marks them sent. Delivery is
at-least-once: after a crash between the publish and the mark, the event is
published again with the same ``uuid_string``.

.. versionadded:: 4.0
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, Final

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from .._telemetry import otel as _instrument
from ..events import DomainEvent, new_event
from .models import OutboxEvent

__all__ = ["failed_events", "prune_sent_events", "publish_via_outbox", "retry_failed_events"]

#: Rows deleted per statement when pruning (keeps each transaction short).
PRUNE_CHUNK_SIZE: Final = 900  # below SQLite's old limit of 999 query parameters


def publish_via_outbox(  # publish_domain_event's event arguments (tests/django/test_signatures.py)
    routing_key: str,
    data: Any,
    domain_object_id: str | None = None,
    uuid_string: str | None = None,
    timestamp: float | None = None,
    *,
    using: str | None = None,
) -> DomainEvent:
    """Write a domain event into the outbox, in the current transaction.

    Call it inside the ``transaction.atomic()`` block that changes the data
    the event is about: the event is committed or rolled back with it. Outside
    a transaction the row is committed at once. The relay publishes it later;
    this function does no network I/O.

    Args:
        routing_key: ``<domain>.<event_type>``, e.g. ``user.registered``.
        data: the payload; must be JSON-serializable.
        domain_object_id: optional identifier of the domain object.
        uuid_string: the event's id; a new UUID4 when left out.
        timestamp: Unix seconds (UTC); now when left out.
        using: the database alias to write to; the same as the caller's
            transaction (default: the router's choice, normally
            ``"default"``).

    Returns:
        The :class:`DomainEvent` as it will be published.

    Raises:
        ValueError: the routing key is empty, not a str, or too long.
        TypeError: ``data`` is not JSON-serializable.
        django.db.DatabaseError: the row could not be written.

    .. versionadded:: 4.0
    """
    event, body = new_event(routing_key, data, domain_object_id, uuid_string, timestamp)
    trace = _instrument.trace_headers()
    OutboxEvent.objects.using(using).create(
        routing_key=event.routing_key,
        uuid_string=event.uuid_string,
        body=body,
        trace_context=json.dumps(trace) if trace else "",
    )
    return event


def prune_sent_events(older_than: timedelta, *, using: str | None = None) -> int:
    """Delete outbox rows that were sent more than ``older_than`` ago.

    Pending rows are never deleted.

    Args:
        older_than: minimum age of the ``sent_at`` time; not negative.
        using: the database alias (default: the router's choice).

    Returns:
        The number of rows deleted.

    Raises:
        ValueError: ``older_than`` is negative.

    .. versionadded:: 4.0
    .. versionchanged:: 4.2 An ``older_than`` reaching before the year 1
       (e.g. ``timedelta.max``) deletes nothing instead of raising
       ``OverflowError``.
    """
    if older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, not {older_than}")
    try:
        cutoff = timezone.now() - older_than
    except OverflowError:  # before the year 1: nothing was sent that long ago
        return 0
    manager = OutboxEvent.objects.db_manager(using)
    deleted = 0
    while True:
        with transaction.atomic(using=manager.db):
            ids = list(
                manager.filter(sent_at__lt=cutoff)
                .order_by("id")
                .values_list("id", flat=True)[:PRUNE_CHUNK_SIZE]
            )
            if not ids:
                return deleted
            count, _ = manager.filter(id__in=ids).delete()
        deleted += count


def failed_events(*, using: str | None = None) -> QuerySet[OutboxEvent]:
    """The outbox rows the relay set aside because it could not publish them.

    Each has ``failed_at`` and ``failure_reason`` set; they are neither sent
    nor pruned until :func:`retry_failed_events` makes them pending again.

    Args:
        using: the database alias (default: the router's choice).

    Returns:
        The rows, oldest ``id`` first.

    .. versionadded:: 4.1
    """
    return (
        OutboxEvent.objects.db_manager(using)
        .filter(sent_at__isnull=True, failed_at__isnull=False)
        .order_by("id")
    )


def retry_failed_events(ids: Iterable[int] | None = None, *, using: str | None = None) -> int:
    """Make rows the relay set aside pending again, so that it publishes them.

    Fix the row's body first (or the relay sets it aside again).

    Args:
        ids: the rows' ids; ``None`` means every failed row.
        using: the database alias (default: the router's choice).

    Returns:
        The number of rows made pending.

    Raises:
        TypeError: an id is not an int.

    .. versionadded:: 4.1
    """
    rows = failed_events(using=using)
    if ids is not None:
        wanted = list(ids)
        for pk in wanted:
            if isinstance(pk, bool) or not isinstance(pk, int):
                raise TypeError(f"outbox row ids are ints, not {type(pk).__name__}")
        rows = rows.filter(id__in=wanted)
    count: int = rows.update(failed_at=None, failure_reason="")
    return count
