"""The outbox relay: publishes pending outbox rows in order and marks them sent.

Guarantees:

* **Nothing is lost.** A row is marked sent only after the broker confirmed
  its event, in a database transaction of its own. A crash between the
  confirm and the mark leaves the row pending: it is published again, with
  the same ``uuid_string`` (at-least-once; consumers deduplicate by uuid).
* **Order.** One relay publishes the rows of one database in ``id`` order
  (the order of the inserts). A row whose transaction commits after a
  higher ``id`` was relayed is published when it becomes visible, so the
  order is the insert order only among rows committed by then. After a
  failed publish, the batch stops, the rows before it are marked, and the
  failed row is retried first.
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

from .. import _instrument
from .._config import UNSET, ConnectionSettings, _Unset
from .._connection import backoff_delays
from ..errors import BrokerError, MalformedEventError
from ..events import DomainEvent
from ..publish import Publisher
from .models import OutboxEvent

__all__ = ["OutboxRelay"]

log = logging.getLogger(__name__)

#: Rows published per database transaction, by default.
DEFAULT_BATCH_SIZE: Final = 100
#: Upper bound of ``batch_size`` (SQLite's old limit of 999 query parameters).
MAX_BATCH_SIZE: Final = 900
#: Seconds between two looks at the outbox when it was empty, by default.
DEFAULT_POLL_INTERVAL: Final = 1.0
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

    def __repr__(self) -> str:
        return f"<OutboxRelay database={self.using!r} {self._publisher!r}>"

    def relay_batch(self, should_stop: Callable[[], bool] | None = None) -> tuple[int, int]:
        """Publish up to ``batch_size`` pending rows, oldest first, and mark them.

        Args:
            should_stop: polled between two rows; when it returns true, the
                rows published so far are marked and the batch ends.

        Returns:
            ``(published, fetched)``: rows published and marked sent, and
            rows fetched (fewer than ``batch_size`` means the outbox is
            drained, as far as this relay can see).

        Raises:
            BrokerError: publishing failed; the rows published before it are
                marked sent, the others stay pending.
            django.db.DatabaseError: reading or marking failed; rows
                published but not marked will be published again.
        """
        pending = OutboxEvent.objects.using(self.using).filter(sent_at__isnull=True)
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

    def _publish(
        self, rows: list[tuple[int, str, str]], should_stop: Callable[[], bool] | None
    ) -> tuple[list[int], BrokerError | None]:
        sent: list[int] = []
        for pk, body, trace_context in rows:
            if should_stop is not None and should_stop():
                break
            try:
                event = DomainEvent.from_json(body)
            except MalformedEventError as exc:
                log.error("Outbox row %s holds no domain event (%s); left pending", pk, exc)
                continue
            try:
                with _instrument.use_trace_headers(_trace_headers(trace_context)):
                    self._publisher.publish_event(event)
            except BrokerError as exc:
                return sent, exc
            sent.append(pk)
            log.debug(
                "Relayed outbox row %s: %s (uuid %s)", pk, event.routing_key, event.uuid_string
            )
        return sent, None

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
            stop: set it (e.g. from a SIGTERM handler) to stop after the row
                being published; the rows published so far are marked.

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
        backoff = backoff_delays(INITIAL_BACKOFF, MAX_BACKOFF)
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
                delay = backoff.next()
                log.warning(
                    "Outbox relay on database %r failed (%s: %s); retrying in %.1fs",
                    self.using,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                stop.wait(delay)
                continue
            backoff = backoff_delays(INITIAL_BACKOFF, MAX_BACKOFF)
            total += published
            if fetched < self.batch_size or published == 0:
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
