"""Publishing a domain event once the surrounding database transaction commits."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from .._amqp.config import UNSET, ConnectionSettings, _Unset
from .._publishing.publisher import publish_settings
from ..events import DomainEvent, new_event
from ..publish import publish_domain_event

__all__ = ["publish_on_commit"]

log = logging.getLogger(__name__)


def publish_on_commit(  # publish_domain_event's arguments (tests/django/test_signatures.py)
    routing_key: str,
    data: Any,
    domain_object_id: str | None = None,
    uuid_string: str | None = None,
    timestamp: float | None = None,
    connection_settings: ConnectionSettings = UNSET,
    *,
    require_route: bool | _Unset = UNSET,
    using: str | None = None,
) -> DomainEvent:
    """Publish a domain event after the outermost transaction commits.

    The event is built (uuid, timestamp) and its data serialized when this is
    called, so later changes to ``data`` do not leak into it. It is published
    when the outermost ``atomic`` block on ``using`` commits, never when that
    transaction or the savepoint around this call rolls back, and at once when
    no transaction is open.

    A failure to publish after the commit (an unroutable event with
    ``require_route`` among them) is logged at ERROR level (logger
    ``domain_event_broker.django.transaction``, with the routing key and
    uuid) and not raised: the transaction has committed and the request
    should not fail because of the broker. The event is then lost; use
    :func:`domain_event_broker.django.outbox.publish_via_outbox` when that is
    not acceptable.

    Args:
        routing_key: ``<domain>.<event_type>``, e.g. ``user.registered``.
        data: the payload; must be JSON-serializable.
        domain_object_id: optional identifier of the domain object.
        uuid_string: the event's id; a new UUID4 when left out.
        timestamp: Unix seconds (UTC); now when left out.
        connection_settings: an AMQP URL or list of URLs; ``None`` sends
            nothing; left out: the configured default.
        require_route: as :func:`~domain_event_broker.publish_domain_event`:
            the event is unroutable when no queue is bound for
            ``routing_key``, and then logged as a failure; default ``False``,
            see :func:`~domain_event_broker.configure`.
        using: the database alias whose transaction to wait for (default:
            ``"default"``).

    Returns:
        The event that will be published (3.0.2 returned ``None``).

    Raises:
        ValueError: the routing key is empty, not a str, or too long.
        TypeError: ``data`` is not JSON-serializable, or ``require_route``
            not a bool.
        ConfigurationError: ``connection_settings`` is malformed.

    .. versionchanged:: 4.0
       Returns the event; validates before the commit; logs instead of
       raising when publishing fails after the commit; ``using`` added.

    .. versionchanged:: 4.1
       ``require_route``.
    """
    # TypeError, ValueError and ConfigurationError now, not after the commit;
    # the snapshot is immune to later changes of ``data`` by the caller.
    event, body = new_event(routing_key, data, domain_object_id, uuid_string, timestamp)
    publish_settings(connection_settings, require_route)
    snapshot = DomainEvent.from_json(body)

    def publish() -> None:
        try:
            publish_domain_event(
                snapshot.routing_key,
                snapshot.data,
                domain_object_id=snapshot.domain_object_id,
                uuid_string=snapshot.uuid_string,
                timestamp=snapshot.timestamp,
                connection_settings=connection_settings,
                require_route=require_route,
            )
        except Exception:  # the commit is done: never fail the request
            log.error(
                "Publishing domain event %s (uuid %s) after commit failed; the event is lost",
                snapshot.routing_key,
                snapshot.uuid_string,
                exc_info=True,
            )

    transaction.on_commit(publish, using=using)
    return event
