"""The outbox relay: publishes pending outbox rows in order and marks them sent.

Guarantees:

* **Nothing is lost.** A batch of rows is published with one wait for the
  broker's confirms (:meth:`~domain_event_broker.Publisher.publish_many`);
  a row is marked sent only after the broker confirmed its event. A crash
  between the confirm and the mark leaves the row pending: it is published
  again, with the same ``uuid_string`` (at-least-once; consumers
  deduplicate by uuid).
* **Order.** One relay publishes the rows of one database in ``id`` order
  (the order of the inserts). A row whose transaction commits after a
  higher ``id`` was relayed is published when it becomes visible, so the
  order is the insert order only among rows committed by then. After a
  lost connection, the unconfirmed rows of the batch are published again
  in order (their first copies keep the order). An event the broker
  refuses (nacks) stays pending and is published again after the rows of
  its batch that were confirmed.
* **A bad row does not stall the outbox.** A row that cannot be published
  (its body is not a domain event) is set aside: marked failed with the
  reason (``failed_at``, ``failure_reason``), logged at ERROR level, and
  skipped; the rows after it go on. :func:`~.outbox.retry_failed_events`
  makes it pending again.
* **Several relays at once** are safe. Where the database supports
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL 8, Oracle, recent
  MariaDB), each relay locks the batch it publishes and the others skip it:
  no duplicates, but batches of different relays interleave, so the global
  order holds only with one relay. Elsewhere (SQLite) relays do not lock: a
  second relay loses nothing but publishes many rows twice; run one.

.. versionadded:: 4.0
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Final

from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    close_old_connections,
    connections,
    transaction,
)
from django.utils import timezone

from .._amqp.config import UNSET, ConnectionSettings, _Unset
from .._amqp.link import Recovery
from .._telemetry import otel as _instrument
from ..errors import BatchPublishError, BrokerError
from ..events import DomainEvent, check_event
from ..publish import Publisher
from .models import OutboxEvent

__all__ = ["OutboxRelay"]

log = logging.getLogger(__name__)

#: Rows published per database transaction, by default.
DEFAULT_BATCH_SIZE: Final = 500
#: Upper bound of ``batch_size`` (SQLite's old limit of 999 query parameters).
MAX_BATCH_SIZE: Final = 900
#: Seconds between two looks at the outbox when it was empty, by default.
DEFAULT_POLL_INTERVAL: Final = 1.0
#: The longest ``failure_reason`` stored for a row set aside.
MAX_REASON_LENGTH: Final = 2000
#: First and longest pause (seconds) after a broker or database failure.
INITIAL_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0


def _trace_headers(stored: str) -> dict[str, str] | None:
    """The trace context stored with a row (``None``: none, or unreadable)."""
    if not stored or not _instrument.ENABLED:
        return None
    try:
        headers = json.loads(stored)
    except ValueError:
        return None
    return headers if isinstance(headers, dict) else None


class OutboxRelay:
    """Publishes pending :class:`~.models.OutboxEvent` rows of one database.

    Args:
        connection_settings: the broker: an AMQP URL, a list of URLs,
            ``None`` (mark rows sent without publishing), or left out for the
            configured default (the ``DOMAIN_EVENT_BROKER`` setting).
        using: the database alias whose outbox to relay.
        batch_size: rows published per database transaction (1 to 900).
        timeout: seconds one publish may take before a
            :class:`~domain_event_broker.BrokerError`; default: the configured
            timeout.

    Raises:
        ValueError: ``batch_size`` is out of range or ``using`` unknown.
        ConfigurationError: ``connection_settings`` is malformed.

    Use it as a context manager, or call :meth:`close` when done.

    .. versionadded:: 4.0
    """

    def __init__(
        self,
        connection_settings: ConnectionSettings = UNSET,
        *,
        using: str = DEFAULT_DB_ALIAS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float | _Unset = UNSET,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"batch_size must be an int, not {type(batch_size).__name__}")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, not {batch_size}")
        if using not in connections:
            raise ValueError(f"no database {using!r} in settings.DATABASES")
        self.using = using
        self.batch_size = batch_size
        self._publisher = Publisher(connection_settings, timeout=timeout)
        self._set_aside = 0

    def __repr__(self) -> str:
        return f"<OutboxRelay database={self.using!r} {self._publisher!r}>"

    def relay_batch(self, should_stop: Callable[[], bool] | None = None) -> tuple[int, int]:
        """Publish up to ``batch_size`` pending rows, oldest first, and mark them.

        The rows are published as one batch, with one wait for the broker's
        confirms, and marked sent once confirmed. Rows that cannot be
        published (their body is not a domain event) are set aside as failed
        (see :attr:`set_aside`) and skipped.

        Args:
            should_stop: polled before publishing; when it returns true, the
                batch ends without publishing.

        Returns:
            ``(published, fetched)``: rows published and marked sent, and
            rows fetched, those set aside included (fewer than
            ``batch_size`` means the outbox is drained, as far as this relay
            can see).

        Raises:
            BrokerError: publishing failed; the rows confirmed are marked
                sent, the others stay pending
                (:exc:`~domain_event_broker.BatchPublishError` says which).
            django.db.DatabaseError: reading or marking failed; rows
                published but not marked will be published again.
        """
        pending = OutboxEvent.objects.using(self.using).filter(
            sent_at__isnull=True, failed_at__isnull=True
        )
        if connections[self.using].features.has_select_for_update_skip_locked:
            with transaction.atomic(using=self.using):
                rows = list(
                    pending.select_for_update(skip_locked=True)
                    .order_by("id")
                    .values_list("id", "body", "trace_context")[: self.batch_size]
                )
                sent, error = self._publish(rows, should_stop)
                self._mark_sent(sent)
        else:
            # No row locks: do not hold a transaction (SQLite would lock the
            # whole database) while waiting for the broker.
            rows = list(
                pending.order_by("id").values_list("id", "body", "trace_context")[: self.batch_size]
            )
            sent, error = self._publish(rows, should_stop)
            self._mark_sent(sent)
        if error is not None:
            raise error
        return len(sent), len(rows)

    @property
    def set_aside(self) -> int:
        """How many rows this relay set aside as failed, since it was created.

        .. versionadded:: 4.1
        """
        return self._set_aside

    def _publish(
        self, rows: list[tuple[int, str, str]], should_stop: Callable[[], bool] | None
    ) -> tuple[list[int], BrokerError | None]:
        """Publish ``rows`` as one batch; the ids confirmed, and the error if any."""
        if not rows or (should_stop is not None and should_stop()):
            return [], None
        ids: list[int] = []
        events: list[DomainEvent] = []
        bodies: list[bytes] = []
        parents: list[dict[str, str] | None] = []
        for pk, body, trace_context in rows:
            try:
                event = DomainEvent.from_json(body)
                encoded = check_event(event)  # the boundary rules every publish obeys
            except (ValueError, TypeError) as exc:  # MalformedEventError is a ValueError
                self._set_row_aside(pk, exc)
                continue
            ids.append(pk)
            events.append(event)
            bodies.append(encoded.encode("utf-8"))
            parents.append(_trace_headers(trace_context))
        try:
            # Each event's publish span continues the trace stored with its row.
            self._publisher._publish_batch(events, bodies, parents=parents)
        except BatchPublishError as exc:
            confirmed = {id(event) for event in exc.confirmed}
            sent = [pk for pk, event in zip(ids, events, strict=True) if id(event) in confirmed]
            return sent, exc
        except BrokerError as exc:
            return [], exc
        if events:
            log.debug("Relayed outbox rows %s to %s (%d event(s))", ids[0], ids[-1], len(events))
        return ids, None

    def _set_row_aside(self, pk: int, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_LENGTH]
        OutboxEvent.objects.using(self.using).filter(id=pk).update(
            failed_at=timezone.now(), failure_reason=reason
        )
        self._set_aside += 1
        log.error(
            "Outbox row %s cannot be published and was set aside as failed (%s); the relay "
            "goes on with the next rows. Fix it, then: manage.py relay_domain_events "
            "--retry-failed %s",
            pk,
            reason,
            pk,
        )

    def _mark_sent(self, ids: list[int]) -> None:
        if ids:
            OutboxEvent.objects.using(self.using).filter(id__in=ids).update(sent_at=timezone.now())

    def run(
        self,
        *,
        once: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        stop: threading.Event | None = None,
    ) -> int:
        """Relay until stopped (or, with ``once``, until the outbox is drained).

        Broker and database failures are logged and retried with a jittered
        exponential backoff (up to 30 s); unsent rows are never marked sent.

        Args:
            once: return when no pending row is left instead of polling.
            poll_interval: seconds to wait when the outbox is empty.
            stop: set it (e.g. from a SIGTERM handler) to stop after the
                batch being published; the rows confirmed are marked.

        Returns:
            The number of rows published.

        Raises:
            BrokerError: with ``once``, publishing failed.
            django.db.DatabaseError: with ``once``, the database failed.
            ValueError: ``poll_interval`` is not positive.
        """
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        stop = threading.Event() if stop is None else stop
        total = 0
        recovery = Recovery(
            log,
            self._publisher.connection_settings or "no broker",
            "relaying again",
            component="relay",
            initial_backoff=INITIAL_BACKOFF,
            max_backoff=MAX_BACKOFF,
        )
        while not stop.is_set():
            if not once:
                close_old_connections()
            try:
                published, fetched = self.relay_batch(stop.is_set)
            except (BrokerError, DatabaseError) as exc:
                if once:
                    raise
                if isinstance(exc, DatabaseError):
                    connections[self.using].close()
                    advice = f" (the outbox's database {self.using!r} failed)"
                else:
                    advice = ""
                stop.wait(recovery.on_lost(exc, advice))
                continue
            recovery.on_connected()
            total += published
            if fetched < self.batch_size:
                if once:
                    break
                stop.wait(poll_interval)
        return total

    def close(self) -> None:
        """Close the broker connection."""
        self._publisher.close()

    def __enter__(self) -> OutboxRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
