"""Replay, discard, inspect, summarise, export and import: dead-letter runs for callers.

:mod:`domain_event_broker.replay` is their public face and documents them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final

import pika
import pika.exceptions
import pika.spec

from .._amqp import config as _config
from .._amqp import management as _management
from .._amqp import names as _names
from .._amqp.config import UNSET, BrokerConfig, ConnectionSettings
from .._amqp.connect import CONNECTION_ERRORS, close_quietly, connect
from .._amqp.failures import message_size_limit, translate_pika_error
from .._amqp.probes import exchange_exists, probe_queue
from ..errors import ConfigurationError, DomainEventBrokerError, PublishError
from .letters import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterSummary,
    check_sendable,
    decode_event,
    failure_reason,
    from_record,
    parked_properties,
    parse_age,
    to_record,
    topic_matches,
)
from .run import BATCH_SIZE, PREFETCH, SKIP, Item, Session
from .run_items import DISCARD, LEAVE, RETRY

__all__ = [
    "BATCH_SIZE",
    "DISCARD",
    "LEAVE",
    "RETRY",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterSummary",
    "HandlerStatus",
    "QueueStatus",
    "ReplayIncompleteError",
    "ReplayResult",
    "discard_dead_letters",
    "export_dead_letters",
    "failure_reason",
    "handler_status",
    "import_dead_letters",
    "inspect_dead_letters",
    "parse_age",
    "replay_all",
    "replay_dead_letters",
    "replay_event",
    "retry_event",
    "summarize_dead_letters",
    "topic_matches",
]

log = logging.getLogger(__name__)

_ACTIONS: Final = frozenset({RETRY, LEAVE, DISCARD})

#: The delay of ``Retry()`` without arguments (seconds); :func:`handler_status`
#: always looks for its delay queue.
DEFAULT_RETRY_DELAY: Final = 10.0

#: A callback slower than this (seconds), or one that takes ``keepalive``
#: (it waits for something, e.g. a person), has each answer carried out at
#: once instead of batched.
SLOW_CALLBACK: Final = 0.05
#: :func:`inspect_dead_letters` with a ``limit`` up to this holds the dead
#: letters and returns them in place; beyond, it walks the whole queue.
INSPECT_WINDOW: Final = 1000

MessageCallback = Callable[..., str]
"""A replay callback: called with keyword arguments, returns an action."""

Progress = Callable[["ReplayResult", int], None]
"""Called after each event a run carried out: the counts so far, and the
number of events the run covers."""


def retry_event(body: bytes, **kwargs: Any) -> str:
    """The default replay callback: retry every event.

    Args:
        body: the dead letter's body (unused).
        **kwargs: the other callback arguments (unused).

    Returns:
        :data:`RETRY`.
    """
    return RETRY


# -- results ----------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    """What one replay run did.

    Attributes:
        replayed: events republished to the handler (:data:`RETRY`).
        discarded: events removed (:data:`DISCARD`).
        left: events kept in the dead-letter queue (:data:`LEAVE`).
        remaining: messages in the dead-letter queue when the run ended,
            the events left included.
        skipped: events a filter passed over (kept in place, not offered).
        unroutable: events answered :data:`RETRY` whose copy could not be
            routed to the handler; kept in the dead-letter queue.

    .. versionadded:: 4.0
    .. versionchanged:: 4.1 ``skipped`` and ``unroutable``.
    """

    replayed: int = 0
    discarded: int = 0
    left: int = 0
    remaining: int = 0
    skipped: int = 0
    unroutable: int = 0

    @property
    def offered(self) -> int:
        """How many events the callback was asked about."""
        return self.replayed + self.discarded + self.left + self.unroutable

    @property
    def visited(self) -> int:
        """How many events the run went through, skipped ones included."""
        return self.offered + self.skipped


class ReplayIncompleteError(PublishError):
    """Some replayed events could not be routed to their handler.

    Raised at the end of a run that carried out everything else; the events
    concerned stay in the dead-letter queue.

    Attributes:
        result: the counts of the whole run.

    .. versionadded:: 4.1
    """

    def __init__(self, message: str, result: ReplayResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class QueueStatus:
    """Counts of one queue; ``None`` counts when the queue does not exist.

    .. versionadded:: 4.0
    """

    name: str
    messages: int | None
    consumers: int | None

    @property
    def exists(self) -> bool:
        """Whether the queue exists on the broker."""
        return self.messages is not None


@dataclass(frozen=True)
class HandlerStatus:
    """The queues of one handler, as :func:`handler_status` found them.

    Attributes:
        exchanges: whether the handler's retry and dead-letter exchanges
            exist, by name.
        delay_queues_listed: ``True`` when the broker's management API
            listed the delay queues, so that ``delay_queues`` holds all of
            them; ``False`` when only the delays asked for were looked up.

    .. versionadded:: 4.0
    .. versionchanged:: 4.1
       ``exchanges`` and ``delay_queues_listed``.
    """

    queue: QueueStatus
    dead_letter_queue: QueueStatus
    delay_queues: tuple[QueueStatus, ...]
    exchanges: Mapping[str, bool] = field(default_factory=dict)
    delay_queues_listed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable form (what ``status --json`` prints)."""

        def one(status: QueueStatus) -> dict[str, Any]:
            return {
                "name": status.name,
                "exists": status.exists,
                "messages": status.messages,
                "consumers": status.consumers,
            }

        return {
            "queue": one(self.queue),
            "dead_letter_queue": one(self.dead_letter_queue),
            "delay_queues": [one(status) for status in self.delay_queues],
            "delay_queues_listed": self.delay_queues_listed,
            "exchanges": [{"name": k, "exists": v} for k, v in self.exchanges.items()],
        }


# -- calling callbacks --------------------------------------------------------


#: What 3.0.2 passed to every callback.
_CLASSIC_ARGUMENTS: Final = frozenset({"frame", "header", "body"})
#: Every keyword argument a callback can ask for.
_ALL_ARGUMENTS: Final = _CLASSIC_ARGUMENTS | {"event", "keepalive"}


def _callback_arguments(callback: Callable[..., Any]) -> frozenset[str]:
    """The keyword arguments to call ``callback`` with.

    ``**kwargs`` callbacks get 3.0.2's arguments plus ``event``; others get
    the arguments they name; ``keepalive`` only when named.
    """
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # builtins and the like: 3.0.2 arguments only
        return _CLASSIC_ARGUMENTS
    named = {
        parameter.name
        for parameter in parameters
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return _CLASSIC_ARGUMENTS | {"event"} | (named & {"keepalive"})
    return frozenset(named & _ALL_ARGUMENTS)


# -- running ----------------------------------------------------------------------


def _result(session: Session, remaining: int = 0) -> ReplayResult:
    counts = session.counts
    return ReplayResult(
        replayed=counts.replayed,
        discarded=counts.discarded,
        left=counts.left,
        remaining=remaining,
        skipped=counts.skipped,
        unroutable=counts.unroutable,
    )


def _letter(item: Item) -> DeadLetter:
    return DeadLetter(
        routing_key=item.routing_key,
        body=item.body,
        properties=item.logical,
        event=decode_event(item.body),
    )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, not {limit!r}")


def _check_filter(where: DeadLetterFilter | None) -> DeadLetterFilter:
    if where is None:
        return DeadLetterFilter()
    if not isinstance(where, DeadLetterFilter):
        raise TypeError(f"where must be a DeadLetterFilter or None, not {type(where).__name__}")
    return where


def _walk(
    name: str,
    config: BrokerConfig,
    purpose: str,
    decide: Callable[[Item, Session], str | None],
    *,
    limit: int | None = None,
    on_progress: Progress | None = None,
    before_commit: Callable[[], None] | None = None,
    counts_skipped: bool = True,
    prefetch: int = PREFETCH,
) -> ReplayResult:
    """Visit the dead letters of ``name`` present at the start, once each.

    ``decide`` returns the action for an item, or ``None`` when it already
    flushed the session itself. ``limit`` bounds the items not skipped;
    ``counts_skipped=False`` promises none is skipped (so progress reports
    ``limit`` as the total when it is smaller).
    """
    total = 0

    def done(item: Item) -> None:
        if on_progress is not None:
            on_progress(_result(session), total)

    if limit is not None and not counts_skipped:
        prefetch = max(1, min(prefetch, limit))  # replay_event: one, not two batches
    with Session(
        name, config, purpose, on_done=done, before_commit=before_commit, prefetch=prefetch
    ) as session:
        total = session.count_at_start
        if limit is not None and not counts_skipped:
            total = min(total, limit)
        log.info("Going through %d dead letter(s) of %s (%s)", total, session.queue, purpose)
        chosen = 0
        try:
            for _ in range(total):
                if limit is not None and chosen >= limit:
                    break
                item = session.get()
                if item is None:
                    break
                action = decide(item, session)
                if action is not None:
                    session.decide(item, action)
                if item.action != SKIP:
                    chosen += 1
                if session.pending >= BATCH_SIZE:
                    session.flush()
        except Exception as exc:
            if not isinstance(exc, DomainEventBrokerError):
                # Carry out what was answered before.
                try:
                    session.flush()
                except DomainEventBrokerError:
                    log.warning("Carrying out the answers given before failed", exc_info=True)
            raise
        session.stop_taking()
        session.flush()
        result = _result(session, session.finish())
    log.info(
        "%s: replayed %d, discarded %d, left %d, skipped %d, unroutable %d; %d remaining",
        session.queue,
        result.replayed,
        result.discarded,
        result.left,
        result.skipped,
        result.unroutable,
        result.remaining,
    )
    if result.unroutable:
        reasons = "; ".join(
            f"{reason} {', '.join(repr(key) for key in sorted(keys)[:10])}"
            + (" ..." if len(keys) > 10 else "")
            for reason, keys in session.counts.unroutable_reasons.items()
        )
        error = ReplayIncompleteError(
            f"{result.unroutable} dead letter(s) of {session.queue!r} could not be replayed "
            f"({reasons}); they were left in place (does the handler's queue {name!r} still "
            "exist and is it bound?)",
            result,
        )
        cause = session.exchange_error
        if cause is not None:
            raise error from cause
        raise error
    return result


def _replay(
    name: str,
    message_callback: MessageCallback,
    config: BrokerConfig,
    limit: int | None,
    on_progress: Progress | None,
    where: DeadLetterFilter,
) -> ReplayResult:
    wanted = _callback_arguments(message_callback)
    # A callback that waits (for a person, say) has each answer carried out
    # at once, before it is asked about the next event.
    interactive = "keepalive" in wanted
    everything = where.matches_everything
    visited = 0

    def decide(item: Item, session: Session) -> str | None:
        if not everything and not where.matches(_letter(item)):
            return SKIP
        nonlocal visited
        visited += 1
        # What basic.get gave 3.0.2's callbacks; the routing key is the
        # event's own, even after a move to the tail.
        delivered = item.frame
        frame = pika.spec.Basic.GetOk(
            delivered.delivery_tag,
            delivered.redelivered,
            delivered.exchange,
            item.routing_key,
            max(0, session.count_at_start - visited),
        )
        arguments: dict[str, Any] = {"frame": frame, "header": item.logical, "body": item.body}
        if "event" in wanted:
            arguments["event"] = decode_event(item.body)
        arguments["keepalive"] = session.keepalive
        started = time.monotonic()
        action = message_callback(
            **{key: value for key, value in arguments.items() if key in wanted}
        )
        if action not in _ACTIONS:
            raise ValueError(
                f"the replay callback returned {action!r}; expected RETRY, LEAVE or "
                f"DISCARD (the event was left in the dead-letter queue)"
            )
        session.decide(item, action)
        if interactive or time.monotonic() - started > SLOW_CALLBACK:
            session.flush()
        return None

    return _walk(
        name,
        config,
        "replay",
        decide,
        limit=limit,
        on_progress=on_progress,
        counts_skipped=not everything,
        # A person answering holds only the event on screen.
        prefetch=1 if interactive else PREFETCH,
    )


def replay_dead_letters(
    name: str,
    message_callback: MessageCallback = retry_event,
    connection_settings: ConnectionSettings = UNSET,
    *,
    limit: int | None = None,
    on_progress: Progress | None = None,
    where: DeadLetterFilter | None = None,
) -> ReplayResult:
    """Offer the dead letters of handler ``name`` to ``message_callback``,
    and do what it answers, over one connection.

    Events are offered oldest first, each at most once per call: the run
    covers the messages in the dead-letter queue when it starts.

    Args:
        name: the handler (queue) name given to ``Subscriber.register``.
        message_callback: called with keyword arguments (see the module
            documentation); returns :data:`RETRY`, :data:`LEAVE` or
            :data:`DISCARD`.
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.
        limit: offer at most this many events; ``None`` for all.
        on_progress: called after each event carried out with the counts so
            far and the number of events the run covers.
        where: offer only the events this filter picks; the others stay in
            place (counted as ``skipped``).

    Returns:
        The counts of the run; with ``connection_settings=None`` all zero.

    Raises:
        ValueError: the callback returned something else (that event stays
            in the dead-letter queue, the answers before are carried out).
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue;
            nothing was created on the broker.
        ReplayIncompleteError: some replayed events could not be routed;
            they stay in the dead-letter queue, the rest was carried out.
        BrokerError: talking to the broker failed, and reconnecting did not
            help; what was carried out stays carried out, the rest in place.

    .. versionadded:: 4.0
    .. versionchanged:: 4.1 ``where``; unroutable events no longer stop the run.
    """
    _check_limit(limit)
    where = _check_filter(where)
    config = _config.resolve(connection_settings)
    if config is None:
        return ReplayResult()
    return _replay(name, message_callback, config, limit, on_progress, where)


def replay_event(
    queue_name: str,
    message_callback: MessageCallback = retry_event,
    connection_settings: ConnectionSettings = UNSET,
) -> int:
    """Offer the oldest dead letter of handler ``queue_name`` to
    ``message_callback`` and do what it answers.

    Args:
        queue_name: the handler (queue) name; its dead letters are in
            ``<queue_name>-dl``.
        message_callback: called with keyword arguments ``frame``, ``header``,
            ``body`` (and ``event`` if it takes it); returns :data:`RETRY`
            (the default), :data:`LEAVE` or :data:`DISCARD`.
        connection_settings: an AMQP URL or list of URLs; ``None`` does
            nothing; left out (or ``''``): the configured default.

    Returns:
        The number of other dead letters in the queue: as in 3.0.2, the event
        just offered is not counted even when it was left there.

    Raises:
        ValueError: the callback returned something else; the event stays.
        DeadLetterQueueNotFoundError: ``queue_name`` has no dead-letter queue.
        ReplayIncompleteError: the replayed event could not be routed; it
            stays in the dead-letter queue.
        BrokerError: talking to the broker failed.
    """
    config = _config.resolve(connection_settings)
    if config is None:
        return 0
    result = _replay(queue_name, message_callback, config, 1, None, DeadLetterFilter())
    return max(0, result.remaining - result.left)


def replay_all(
    queue_name: str,
    message_callback: MessageCallback = retry_event,
    connection_settings: ConnectionSettings = UNSET,
    *,
    where: DeadLetterFilter | None = None,
) -> int:
    """Offer every dead letter of handler ``queue_name`` to
    ``message_callback`` once, over one connection.

    The run covers the messages in the dead-letter queue when it starts:
    events left (:data:`LEAVE`) and events dead-lettered again during the
    run are not offered twice.

    Args:
        queue_name: the handler (queue) name; its dead letters are in
            ``<queue_name>-dl``.
        message_callback: as for :func:`replay_event`.
        connection_settings: as for :func:`replay_event`.
        where: offer only the events this filter picks (4.1).

    Returns:
        The number of messages in the dead-letter queue when the run ended:
        the events left plus any dead-lettered meanwhile.

    Raises:
        ValueError: the callback returned something else; that event and the
            events left so far stay in the dead-letter queue.
        DeadLetterQueueNotFoundError: ``queue_name`` has no dead-letter queue.
        ReplayIncompleteError: some replayed events could not be routed.
        BrokerError: talking to the broker failed.
    """
    return replay_dead_letters(
        queue_name, message_callback, connection_settings, where=where
    ).remaining


def discard_dead_letters(
    name: str,
    connection_settings: ConnectionSettings = UNSET,
    *,
    where: DeadLetterFilter | None = None,
    limit: int | None = None,
    export_to: IO[str] | None = None,
    on_progress: Progress | None = None,
) -> ReplayResult:
    """Remove the dead letters of handler ``name`` that ``where`` picks.

    Args:
        name: the handler (queue) name.
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.
        where: which ones; ``None``: all of them.
        limit: remove at most this many.
        export_to: a text file: each dead letter removed is first written to
            it as a line of JSON (see :func:`export_dead_letters`), flushed
            and synced to disk before the removal is committed.
        on_progress: as for :func:`replay_dead_letters`.

    Returns:
        The counts: ``discarded`` and ``skipped``.

    Raises:
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue.
        BrokerError: talking to the broker failed.

    .. versionadded:: 4.1
    """
    _check_limit(limit)
    where = _check_filter(where)
    config = _config.resolve(connection_settings)
    if config is None:
        return ReplayResult()
    everything = where.matches_everything

    def decide(item: Item, session: Session) -> str:
        letter = _letter(item)
        if not everything and not where.matches(letter):
            return SKIP
        if export_to is not None:
            export_to.write(to_record(letter) + "\n")
        return DISCARD

    return _walk(
        name,
        config,
        "discard",
        decide,
        limit=limit,
        on_progress=on_progress,
        before_commit=None if export_to is None else lambda: _sync(export_to),
        counts_skipped=not everything,
    )


def _sync(file: IO[str]) -> None:
    file.flush()
    # Not a real file (a StringIO): flushed is all there is to do.
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.fsync(file.fileno())


# -- looking without removing -------------------------------------------------------


def inspect_dead_letters(
    name: str,
    connection_settings: ConnectionSettings = UNSET,
    *,
    limit: int | None = 20,
) -> list[DeadLetter]:
    """The oldest dead letters of handler ``name``, left in place.

    Up to :data:`INSPECT_WINDOW` dead letters are taken unacknowledged and
    returned to their places before this function returns (RabbitMQ marks
    them redelivered). More (``limit=None`` or a larger limit) are walked
    through like a :data:`LEAVE` run: each moves to the tail of the queue.

    Args:
        name: the handler (queue) name.
        connection_settings: an AMQP URL or list of URLs; ``None``: no broker,
            an empty list; left out: the configured default.
        limit: at most this many (``None``: all of them).

    Returns:
        The dead letters, oldest first.

    Raises:
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue.
        BrokerError: talking to the broker failed.

    .. versionadded:: 4.0
    """
    _check_limit(limit)
    config = _config.resolve(connection_settings)
    if config is None:
        return []
    letters: list[DeadLetter] = []
    if limit is not None and limit <= INSPECT_WINDOW:
        with Session(name, config, "inspect", prefetch=max(1, limit)) as session:
            for _ in range(min(limit, session.count_at_start)):
                item = session.get()
                if item is None:
                    break
                letters.append(_letter(item))
        # Closing the channel returned them to their places.
        return letters

    def keep(item: Item, session: Session) -> str:
        letters.append(_letter(item))
        return SKIP

    _walk(name, config, "inspect", keep, limit=limit)
    return letters


def summarize_dead_letters(
    name: str,
    connection_settings: ConnectionSettings = UNSET,
    *,
    where: DeadLetterFilter | None = None,
    on_progress: Progress | None = None,
) -> DeadLetterSummary:
    """Count the dead letters of handler ``name`` by exception type, failing
    handler, routing key and age, in one pass and bounded memory.

    Nothing is removed: each dead letter moves to the tail of the queue,
    so their order is kept (events dead-lettered meanwhile land among them,
    behind those moved before they arrived).

    Args:
        name: the handler (queue) name.
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.
        where: count only the dead letters this filter picks (``scanned``
            counts all).
        on_progress: as for :func:`replay_dead_letters`.

    Returns:
        The counts.

    Raises:
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue.
        BrokerError: talking to the broker failed.

    .. versionadded:: 4.1
    """
    where = _check_filter(where)
    summary = DeadLetterSummary()
    config = _config.resolve(connection_settings)
    if config is None:
        return summary
    now = time.time()

    def count(item: Item, session: Session) -> str:
        letter = _letter(item)
        summary.scanned += 1
        if where.matches(letter, now):
            summary.add(letter, now)
        return SKIP

    _walk(name, config, "summary", count, on_progress=on_progress)
    return summary


def export_dead_letters(
    name: str,
    file: IO[str],
    connection_settings: ConnectionSettings = UNSET,
    *,
    where: DeadLetterFilter | None = None,
    on_progress: Progress | None = None,
) -> int:
    """Write the dead letters of handler ``name`` to ``file``, one JSON
    object per line, without removing them.

    Each line has the routing key, the body in base64 (exact bytes), every
    AMQP property, and every header (values JSON cannot hold exactly are
    tagged, e.g. ``{"$bytes": "..."}``). :func:`import_dead_letters` puts
    them back. Each dead letter moves to the tail of its queue, as in
    :func:`summarize_dead_letters`.

    Args:
        name: the handler (queue) name.
        file: a text file open for writing.
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.
        where: write only the dead letters this filter picks.
        on_progress: as for :func:`replay_dead_letters`.

    Returns:
        How many dead letters were written.

    Raises:
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue.
        BrokerError: talking to the broker failed.

    .. versionadded:: 4.1
    """
    where = _check_filter(where)
    config = _config.resolve(connection_settings)
    if config is None:
        return 0
    written = 0
    everything = where.matches_everything

    def write(item: Item, session: Session) -> str:
        nonlocal written
        letter = _letter(item)
        if everything or where.matches(letter):
            file.write(to_record(letter) + "\n")
            written += 1
        return SKIP

    _walk(name, config, "export", write, on_progress=on_progress)
    file.flush()
    return written


def import_dead_letters(
    name: str,
    file: IO[str],
    connection_settings: ConnectionSettings = UNSET,
) -> int:
    """Put dead letters written by :func:`export_dead_letters` (or
    ``discard --export``) back into handler ``name``'s dead-letter queue,
    at its tail, in the order of the file.

    The whole file is checked before anything is sent: every field is
    checked as pika's encoder and the broker would check it (types, ranges,
    255-byte short strings and header names, nested tables and arrays,
    decimals, times, the size of the headers against ``frame_max``). Then
    the dead letters are published in transactions of :data:`BATCH_SIZE`.

    Args:
        name: the handler (queue) name.
        file: a text file open for reading (seekable: it is read twice).
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.

    Returns:
        How many dead letters were put back.

    Raises:
        ValueError: a line is not an exported dead letter that can be sent;
            the message names the line and the field (nothing was sent).
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue.
        BrokerError: talking to the broker failed (e.g. it refused a
            ``user_id`` that is not the importing user's); the error names
            the line and says how many were put back before.

    .. versionadded:: 4.1
    """
    start = file.tell()
    config = _config.resolve(connection_settings)
    frame_max = min(
        (params.frame_max for params in config.parameters("import", 1.0)) if config else (),
        default=pika.spec.FRAME_MAX_SIZE,
    )
    for number, line in enumerate(file, 1):
        if line.strip():
            try:
                routing_key, properties, _ = from_record(line)
                size = check_sendable(properties, routing_key)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            except RecursionError:
                raise ValueError(
                    f"line {number}: nested too deeply to check or send "
                    f"(more levels than Python's recursion limit)"
                ) from None
            if size > frame_max:
                raise ValueError(
                    f"line {number}: properties: {size} bytes with the headers, more than "
                    f"the connection's frame_max of {frame_max} allows (the broker would "
                    f"close the connection)"
                )
    file.seek(start)
    if config is None:
        return 0
    queue = _names.dead_letter_queue(name)
    imported = 0
    with Session(name, config, "import") as session:
        channel = session.channel
        #: (line number, body size) of the transaction not committed yet
        pending: list[tuple[int, int]] = []
        try:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                routing_key, properties, body = from_record(line)
                pending.append((number, len(body)))
                channel.basic_publish(
                    "", queue, body, parked_properties(properties, routing_key), mandatory=True
                )
                if len(pending) >= BATCH_SIZE:
                    channel.tx_commit()
                    imported += len(pending)
                    pending = []
            if pending:
                channel.tx_commit()
                imported += len(pending)
        except CONNECTION_ERRORS as exc:
            raise translate_pika_error(
                exc, _import_failure(queue, imported, pending, message_size_limit(exc))
            ) from exc
    log.info("Put %d dead letter(s) back into %s", imported, queue)
    return imported


def _import_failure(
    queue: str, imported: int, pending: list[tuple[int, int]], size_limit: int | None
) -> str:
    """What an import that the broker stopped midway says: the line (or the
    lines of the transaction it refused), and how many were put back."""
    put_back = (
        f"{imported} dead letter(s) were put back before: the file's first {imported}; "
        f"the rest were not"
    )
    too_large = [(n, size) for n, size in pending if size_limit is not None and size > size_limit]
    if too_large:
        number, size = too_large[0]
        return (
            f"importing into {queue!r}: line {number}: body: {size} bytes, more than the "
            f"broker's max_message_size of {size_limit} ({put_back})"
        )
    if not pending:
        return f"importing into {queue!r} ({put_back})"
    first, last = pending[0][0], pending[-1][0]
    lines = f"line {first}" if first == last else f"one of lines {first} to {last}"
    return f"importing {lines} into {queue!r} ({put_back})"


def handler_status(
    name: str,
    connection_settings: ConnectionSettings = UNSET,
    *,
    delays: Iterable[float] = (),
) -> HandlerStatus:
    """Message and consumer counts of handler ``name``'s queues, and whether
    its retry and dead-letter exchanges exist.

    Nothing is created on the broker. AMQP cannot list queues: the delay
    queues are listed with the broker's management HTTP API when it answers
    (see :attr:`HandlerStatus.delay_queues_listed`); they are also looked up
    by delay, for the default ``Retry()`` delay and the ``delays`` given.

    Args:
        name: the handler (queue) name.
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.
        delays: retry delays (seconds) the handler uses, besides the default.

    Returns:
        The counts; a queue that does not exist has ``None`` counts.

    Raises:
        ConfigurationError: ``connection_settings`` is ``None`` or malformed.
        BrokerError: talking to the broker failed.

    .. versionadded:: 4.0
    """
    config = _config.resolve(connection_settings)
    if config is None:
        raise ConfigurationError("no broker configured (connection_settings is None)")
    listed = _management.delay_queue_delays(config, name)
    milliseconds = sorted(
        {_names.delay_ms(delay) for delay in (DEFAULT_RETRY_DELAY, *delays)} | set(listed or ())
    )
    exchanges = [_names.retry_exchange(name), _names.dead_letter_exchange(name)]
    queues = [
        name,
        _names.dead_letter_queue(name),
        *(queue for ms in milliseconds for queue in _names.delay_queues(name, ms)),
    ]
    connection = connect(config, f"domain-event-broker status (pid {os.getpid()})")
    try:
        statuses = [_queue_status(connection, queue) for queue in queues]
        found = {exchange: exchange_exists(connection, exchange) for exchange in exchanges}
    except CONNECTION_ERRORS as exc:
        raise translate_pika_error(exc, f"reading the status of {name!r}") from exc
    finally:
        close_quietly(connection)
    delay_statuses = tuple(status for status in statuses[2:] if status.exists)
    return HandlerStatus(statuses[0], statuses[1], delay_statuses, found, listed is not None)


def _queue_status(connection: pika.BlockingConnection, queue: str) -> QueueStatus:
    found = probe_queue(connection, queue)
    if not found.exists:
        return QueueStatus(queue, None, None)
    return QueueStatus(queue, found.messages, found.consumers)
