"""Helpers for testing code that publishes domain events.

.. versionadded:: 4.0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import publish
from .events import DomainEvent

__all__ = ["capture_events"]


@contextmanager
def capture_events() -> Iterator[list[DomainEvent]]:
    """Record the events published inside the block instead of sending them.

    Every event published in this process while the block runs, from any
    thread, through :func:`~domain_event_broker.publish_domain_event` or
    :meth:`Publisher.publish_event <domain_event_broker.Publisher.publish_event>`
    (and so Django's ``publish_on_commit`` once the transaction commits), is
    appended to the list and not sent: no broker is needed. Invalid events
    are still refused as usual (``ValueError``, ``TypeError``). Blocks may
    nest; each records every event. Raw ``Publisher.publish()`` messages are
    sent as usual.

    Yields:
        The list the events are appended to, in publishing order.

    Example::

        with capture_events() as events:
            register_user("ada@example.com")
        assert [e.routing_key for e in events] == ["user.registered"]

    .. versionadded:: 4.0
    """
    events: list[DomainEvent] = []
    with publish._captures_lock:
        publish._captures.append(events)
    try:
        yield events
    finally:
        with publish._captures_lock:
            for index, active in enumerate(publish._captures):
                if active is events:
                    del publish._captures[index]
                    break
