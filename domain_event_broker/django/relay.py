"""The outbox relay: publishes pending outbox rows in order and marks them sent.

Guarantees:

* **Nothing is lost.** A batch of rows is published with one wait for the
  broker's confirms (:meth:`~domain_event_broker.Publisher.publish_many`);
  a row is marked sent only after the broker confirmed its event. A crash
  between the confirm and the mark leaves the row pending: it is published
  again, with the same ``uuid_string`` (at-least-once; consumers
  deduplicate by uuid).
* **No storm of copies.** The relay claims a batch before publishing it (see
  below), so it publishes no batch it cannot then mark. If marking fails
  anyway (the database went away, or SQLite could not commit), the relay
  remembers the rows the broker confirmed and marks them before it publishes
  anything else: it never publishes them again itself.
* **Order.** One relay publishes the rows of one database in ``id`` order
  (the order of the inserts). A row whose transaction commits after a
  higher ``id`` was relayed is published when it becomes visible, so the
  order is the insert order only among rows committed by then. After a
  lost connection, the unconfirmed rows of the batch are published again
  in order (their first copies keep the order). An event the broker
  refuses (nacks) stays pending and is published again after the rows of
  its batch that were confirmed.
* **A bad row does not stall the outbox.** A row that cannot be published
  (its body is not a domain event, or its event is larger than the broker's
  ``max_message_size``) is set aside: marked failed with the reason
  (``failed_at``, ``failure_reason``), logged at ERROR level, and skipped;
  the rows after it go on. :func:`~.outbox.retry_failed_events` makes it
  pending again. The size limit is checked before publishing once known
  (given as ``max_message_size``, or learned from the broker's refusal); an
  event over :data:`LARGE_EVENT_SIZE` is published in a batch of its own,
  after the rows before it were confirmed, so that the broker's refusal
  (which closes the channel) leaves no other event's fate unknown.
* **Several relays at once** are safe. Where the database supports
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL 8, Oracle, recent
  MariaDB), each relay locks the batch it publishes and the others skip it:
  no duplicates, but batches of different relays interleave, so the global
  order holds only with one relay. On SQLite, which has no row locks, the
  relay takes the database's write lock before it reads a batch and holds it
  until the batch is marked: relays (and the application's writes) take
  turns; keep ``timeout`` below the application's SQLite ``timeout``.

.. versionadded:: 4.0
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    close_old_connections,
    connections,
    transaction,
)
from django.db.models import QuerySet
from django.utils import timezone

from .._amqp.config import UNSET, ConnectionSettings, _Unset
from .._amqp.failures import message_size_limit
from .._amqp.link import Recovery
from .._publishing import publisher as _publishing
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
#: Events whose encoded body is larger (bytes) are published in a batch of
#: their own, after the rows before them were confirmed: if the broker refuses
#: one as too large it closes the channel, and the events sent with it would
#: be left unconfirmed (and published again).
LARGE_EVENT_SIZE: Final = 64 * 1024
#: The outbox's columns the relay reads.
_COLUMNS: Final = ("id", "body", "trace_context")


def _trace_headers(stored: str) -> dict[str, str] | None:
    """The trace context stored with a row (``None``: none, or unreadable)."""
    if not stored or not _instrument.ENABLED:
        return None
    try:
        headers = json.loads(stored)
    except ValueError:
        return None
    return headers if isinstance(headers, dict) else None


class _Row(NamedTuple):
    """A row ready to publish: its id, event, encoded body and trace parent."""

    pk: int
    event: DomainEvent
    body: bytes
    parent: dict[str, str] | None


def _first_segment(rows: Sequence[_Row]) -> Sequence[_Row]:
    """The rows to publish first, as one batch: up to the first event over
    :data:`LARGE_EVENT_SIZE`, or that event alone."""
    for index, row in enumerate(rows):
        if len(row.body) > LARGE_EVENT_SIZE:
            return rows[:index] if index else rows[:1]
    return rows


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
        max_message_size: the broker's ``max_message_size`` in bytes, if
            known: rows whose event is larger are set aside without being
            published. Left out, the relay learns it from the broker the
            first time the broker refuses an event as too large.

    Raises:
        ValueError: ``batch_size`` or ``max_message_size`` is out of range,
            or ``using`` unknown.
        ConfigurationError: ``connection_settings`` is malformed.

    Use it as a context manager, or call :meth:`close` when done.

    .. versionadded:: 4.0
    .. versionchanged:: 4.2 The ``max_message_size`` argument.
    """

    def __init__(
        self,
        connection_settings: ConnectionSettings = UNSET,
        *,
        using: str = DEFAULT_DB_ALIAS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float | _Unset = UNSET,
        max_message_size: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"batch_size must be an int, not {type(batch_size).__name__}")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, not {batch_size}")
        if max_message_size is not None and (
            isinstance(max_message_size, bool) or not isinstance(max_message_size, int)
        ):
            raise ValueError(
                f"max_message_size must be an int, not {type(max_message_size).__name__}"
            )
        if max_message_size is not None and max_message_size < 1:
            raise ValueError(f"max_message_size must be positive, not {max_message_size}")
        if using not in connections:
            raise ValueError(f"no database {using!r} in settings.DATABASES")
        self.using = using
        self.batch_size = batch_size
        self._publisher = Publisher(connection_settings, timeout=timeout)
        #: The largest body the broker accepts, when known.
        self._max_size = max_message_size
        #: Ids of the rows set aside (counted once each, once committed).
        self._set_aside_ids: set[int] = set()
        #: Rows the broker confirmed whose mark failed: marked before anything
        #: else is published, never published again by this relay.
        self._unmarked: list[int] = []
        self._relayed = 0

    def __repr__(self) -> str:
        return f"<OutboxRelay database={self.using!r} {self._publisher!r}>"

    def relay_batch(self, should_stop: Callable[[], bool] | None = None) -> tuple[int, int]:
        """Publish up to ``batch_size`` pending rows, oldest first, and mark them.

        Rows confirmed earlier whose mark failed are marked first. The batch is
        claimed (row locks, or SQLite's write lock) before it is published, as
        one batch with one wait for the broker's confirms, and marked sent
        once confirmed. Rows that cannot be published (their body is not a
        domain event, or too large for the broker) are set aside as failed
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
            django.db.DatabaseError: reading, claiming or marking failed;
                nothing was published, or the rows confirmed are marked by
                the next call.
        """
        self._mark_unmarked()
        pending = OutboxEvent.objects.using(self.using).filter(
            sent_at__isnull=True, failed_at__isnull=True
        )
        if (should_stop is not None and should_stop()) or not pending.exists():
            return 0, 0
        if not _publishing._captures:  # capture_events() and StubBroker: no broker
            # Connect before claiming: no lock is held while the broker is down.
            self._publisher.connect()
        with transaction.atomic(using=self.using):
            rows = self._claim(pending)
            # The ids confirmed go to self._unmarked as they are: if marking
            # them fails, the next call marks them instead of publishing them.
            error = self._publish(rows, should_stop)
            sent = list(self._unmarked)
            self._mark_sent(sent)
        # Committed.
        self._unmarked = []
        self._relayed += len(sent)
        if error is not None:
            raise error
        return len(sent), len(rows)

    @property
    def set_aside(self) -> int:
        """How many rows this relay set aside as failed, since it was created.

        Each row counts once, however often it was set aside (e.g. retried
        with :func:`~.outbox.retry_failed_events` without a fix).

        .. versionadded:: 4.1
        """
        return len(self._set_aside_ids)

    @property
    def relayed(self) -> int:
        """How many rows this relay published and marked sent, since it was created.

        .. versionadded:: 4.2
        """
        return self._relayed

    def _claim(self, pending: QuerySet[OutboxEvent]) -> list[tuple[int, str, str]]:
        """Read the next batch, so that it can be marked once published.

        Inside the batch's transaction. Where rows can be locked, the rows are
        locked (others skip them, or wait); on SQLite, the database's write
        lock is taken first, with a write that changes nothing: while the
        application holds it, this fails after SQLite's ``timeout`` with
        "database is locked", before anything is published.
        """
        features = connections[self.using].features
        if features.has_select_for_update_skip_locked:
            pending = pending.select_for_update(skip_locked=True)
        elif features.has_select_for_update:
            pending = pending.select_for_update()
        else:
            OutboxEvent.objects.using(self.using).filter(id__lt=0).update(failure_reason="")
        return list(pending.order_by("id").values_list(*_COLUMNS)[: self.batch_size])

    def _publish(
        self, rows: list[tuple[int, str, str]], should_stop: Callable[[], bool] | None
    ) -> BrokerError | None:
        """Publish ``rows`` in order; the ids confirmed go to :attr:`_unmarked`.

        Returns:
            The error that ended the batch, if any.
        """
        if not rows or (should_stop is not None and should_stop()):
            return None
        ready: list[_Row] = []
        for pk, body, trace_context in rows:
            try:
                event = DomainEvent.from_json(body)
                encoded = check_event(event).encode("utf-8")  # the rules every publish obeys
            except (ValueError, TypeError) as exc:  # MalformedEventError is a ValueError
                self._set_row_aside(pk, f"{type(exc).__name__}: {exc}")
                continue
            if self._max_size is not None and len(encoded) > self._max_size:
                self._set_row_aside(pk, self._too_large(len(encoded)))
                continue
            ready.append(_Row(pk, event, encoded, _trace_headers(trace_context)))
        sent = self._unmarked
        while ready:
            segment = _first_segment(ready)
            confirmed, error = self._publish_segment(segment)
            sent += confirmed
            if error is None:
                ready = ready[len(segment) :]
                continue
            if not self._learn_size_limit(error, segment):
                return error
            # Now known: every row over the limit is set aside, not only this one.
            too_large = [row for row in ready if len(row.body) > (self._max_size or 0)]
            for row in too_large:
                self._set_row_aside(row.pk, self._too_large(len(row.body)))
            # The broker closed the channel under the rest of the segment:
            # publish its rows not confirmed again, in order, on a new channel.
            done = set(confirmed) | {row.pk for row in too_large}
            ready = [row for row in ready if row.pk not in done]
        if sent:
            log.debug("Relayed outbox rows %s to %s (%d event(s))", sent[0], sent[-1], len(sent))
        return None

    def _publish_segment(self, rows: Sequence[_Row]) -> tuple[list[int], BrokerError | None]:
        """Publish ``rows`` as one batch; the ids confirmed, and the error if any."""
        events = [row.event for row in rows]
        try:
            # Each event's publish span continues the trace stored with its row.
            self._publisher._publish_batch(
                events, [row.body for row in rows], parents=[row.parent for row in rows]
            )
        except BatchPublishError as exc:
            confirmed = {id(event) for event in exc.confirmed}
            return [row.pk for row in rows if id(row.event) in confirmed], exc
        except BrokerError as exc:
            return [], exc
        return [row.pk for row in rows], None

    def _learn_size_limit(self, error: BrokerError, rows: Sequence[_Row]) -> bool:
        """Whether ``error`` is the broker refusing a row of ``rows`` as too large.

        Remembers the broker's limit, so that larger rows are set aside
        before publishing from now on.
        """
        causes: list[BaseException] = [error]
        if isinstance(error, BatchPublishError):
            causes += [cause for _, cause in error.failed]
        for cause in causes:
            limit = message_size_limit(cause)
            if limit is not None:
                if self._max_size is None or limit < self._max_size:
                    self._max_size = limit
                break
        if self._max_size is None:
            return False
        return any(len(row.body) > self._max_size for row in rows)

    def _too_large(self, size: int) -> str:
        return (
            f"EventTooLarge: the event is {size} bytes; the broker accepts at most "
            f"{self._max_size} (its max_message_size). Make the event smaller, or raise "
            f"the broker's limit"
        )

    def _set_row_aside(self, pk: int, reason: str) -> None:
        reason = reason[:MAX_REASON_LENGTH]
        OutboxEvent.objects.using(self.using).filter(id=pk).update(
            failed_at=timezone.now(), failure_reason=reason
        )
        # Counted once committed (a rolled-back batch sets it aside again).
        transaction.on_commit(lambda: self._set_aside_ids.add(pk), using=self.using)
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

    def _mark_unmarked(self) -> None:
        """Mark the rows confirmed earlier whose mark failed."""
        if not self._unmarked:
            return
        with transaction.atomic(using=self.using):
            self._mark_sent(self._unmarked)
        log.info(
            "Marked %d outbox row(s) sent that the broker had confirmed before the database failed",
            len(self._unmarked),
        )
        self._relayed += len(self._unmarked)
        self._unmarked = []

    def run(
        self,
        *,
        once: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        stop: threading.Event | None = None,
    ) -> int:
        """Relay until stopped (or, with ``once``, until the outbox is drained).

        Broker and database failures are logged (each saying which side
        failed) and retried with a jittered exponential backoff (up to 30 s);
        unsent rows are never marked sent.

        Args:
            once: return when no pending row is left instead of polling.
            poll_interval: seconds to wait when the outbox is empty.
            stop: set it (e.g. from a SIGTERM handler) to stop after the
                batch being published; the rows confirmed are marked.

        Returns:
            The number of rows published and marked sent by this call (see
            also :attr:`relayed`).

        Raises:
            BrokerError: with ``once``, publishing failed.
            django.db.DatabaseError: with ``once``, the database failed.
            ValueError: ``poll_interval`` is not positive.
        """
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        stop = threading.Event() if stop is None else stop
        start = self._relayed
        broker = Recovery(
            log,
            self._publisher.connection_settings or "no broker",
            "relaying again",
            component="relay",
            initial_backoff=INITIAL_BACKOFF,
            max_backoff=MAX_BACKOFF,
        )
        database = Recovery(
            log,
            self.using,
            "relaying again",
            side=f"The outbox's database {self.using!r}",
            initial_backoff=INITIAL_BACKOFF,
            max_backoff=MAX_BACKOFF,
        )
        while not stop.is_set():
            if not once:
                close_old_connections()
            try:
                _, fetched = self.relay_batch(stop.is_set)
            except DatabaseError as exc:
                if once:
                    raise
                connections[self.using].close()
                stop.wait(database.on_lost(exc, "; nothing more is published until it answers"))
                continue
            except BrokerError as exc:
                if once:
                    raise
                database.on_connected()  # it answered, or the broker would not have been asked
                stop.wait(broker.on_lost(exc))
                continue
            database.on_connected()
            broker.on_connected()
            if fetched < self.batch_size:
                if once:
                    break
                stop.wait(poll_interval)
        return self._relayed - start

    def close(self) -> None:
        """Close the broker connection."""
        self._publisher.close()

    def __enter__(self) -> OutboxRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
