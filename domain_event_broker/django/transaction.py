"""Publishing a domain event once the surrounding database transaction commits."""

from __future__ import annotations

import logging
import time
from typing import Any

from django.db import transaction

from .._amqp.config import UNSET, ConnectionSettings, _Unset
from .._publishing.publisher import publish_event_before, publish_settings
from ..errors import BrokerError
from ..events import DomainEvent, new_event

__all__ = ["publish_on_commit"]

log = logging.getLogger(__name__)


class _CommitGroup:
    """The events one transaction publishes after its commit: they share one
    deadline, so a broker that does not answer holds the commit up for one
    timeout, not one per event."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        #: ``time.monotonic()`` by which the publish under way must end;
        #: ``None``: set by the next publish (after a success, each event
        #: has the full timeout again).
        self.deadline: float | None = None


def _commit_group(using: str | None) -> _CommitGroup:
    """The group of the events already waiting for this transaction's commit,
    or a new one (outside a transaction, or for its first event)."""
    connection = transaction.get_connection(using)
    for entry in connection.run_on_commit:  # (savepoint ids, callback, ...)
        group = getattr(entry[1], "commit_group", None)
        if isinstance(group, _CommitGroup):
            return group
    return _CommitGroup()


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
    should not fail because of the broker. The line says what is known:
    either the event was not published (it is lost), or, when it was sent
    and no confirm came (a broker blocked by a memory alarm, a lost
    connection), that it may or may not have reached the broker, so that
    publishing it again may make a duplicate. Use
    :func:`domain_event_broker.django.outbox.publish_via_outbox` when losing
    an event is not acceptable.

    The events of one transaction share one deadline (the timeout, see
    :func:`~domain_event_broker.configure`): when the broker does not answer,
    the commit is held up for one timeout, not for one per event; the events
    left when it has passed are not attempted, and each is logged as not
    published. A confirmed event gives the next one the full timeout again.

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

    .. versionchanged:: 4.2
       One deadline for a transaction's events; the log line tells an event
       that may have reached the broker from one that did not.
    """
    # TypeError, ValueError and ConfigurationError now, not after the commit;
    # the snapshot is immune to later changes of ``data`` by the caller.
    event, body = new_event(routing_key, data, domain_object_id, uuid_string, timestamp)
    publish_settings(connection_settings, require_route)
    snapshot = DomainEvent.from_json(body)

    group = _commit_group(using)

    def publish() -> None:
        key, uuid_string = snapshot.routing_key, snapshot.uuid_string
        try:
            config, mandatory = publish_settings(connection_settings, require_route)
            timeout = 0.0 if config is None else config.timeout
            now = time.monotonic()
            if group.deadline is None:
                group.deadline = now + timeout
            elif now >= group.deadline and config is not None:
                log.error(
                    "Domain event %s (uuid %s) was not published after commit: the broker "
                    "did not answer within the %gs this transaction's events had; the "
                    "event is lost",
                    key,
                    uuid_string,
                    timeout,
                )
                return
            publish_event_before(snapshot, body.encode("utf-8"), config, mandatory, group.deadline)
            group.deadline = None
        except BrokerError as exc:  # the commit is done: never fail the request
            if exc.maybe_delivered:
                log.error(
                    "Publishing domain event %s (uuid %s) after commit failed, but it may or "
                    "may not have reached the broker (it was sent and not confirmed); do not "
                    "take it for lost: publishing it again may make a duplicate",
                    key,
                    uuid_string,
                    exc_info=True,
                )
            else:
                log.error(
                    "Publishing domain event %s (uuid %s) after commit failed; the event "
                    "was not published and is lost",
                    key,
                    uuid_string,
                    exc_info=True,
                )
        except Exception:  # the commit is done: never fail the request
            log.error(
                "Publishing domain event %s (uuid %s) after commit failed; the event is lost",
                key,
                uuid_string,
                exc_info=True,
            )

    publish.commit_group = group  # type: ignore[attr-defined]  # found by _commit_group()
    transaction.on_commit(publish, using=using)
    return event
