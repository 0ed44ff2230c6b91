"""Replaying dead-lettered domain events, and looking at them before.

A handler registered with ``dead_letter=True`` parks the events it failed on
in its dead-letter queue ``<name>-dl``. Once the cause is fixed, an operator
moves them back: :data:`RETRY` republishes an event to the handler's retry
exchange ``<name>-retry`` (so only that handler sees it again), :data:`DISCARD`
drops it, :data:`LEAVE` keeps it where it is.

Compared with 3.0.2, a replay

* uses one connection for the whole run;
* keeps every property and header of the dead letter (a persistent event
  stays persistent), dropping only RabbitMQ's ``x-death`` bookkeeping and
  resetting the retry count, so the handler gets its retries again;
* acknowledges a dead letter only after the broker took responsibility for
  its republished copy (mandatory publishing, committed in batches: an
  unroutable copy leaves its dead letter in place and raises
  :class:`~domain_event_broker.PublishError`);
* never offers the same event twice in one :func:`replay_all` run.

Message callbacks are called with keyword arguments only. A callback taking
``**kwargs`` (as most written for 3.0.2 do) receives ``frame`` (pika's
``Basic.GetOk``), ``header`` (the ``BasicProperties``), ``body`` (bytes) and
``event``: the decoded :class:`~domain_event_broker.DomainEvent`, or ``None``
when the body is not one. Any other callback receives those of these
arguments it names, so ``def decide(event): ...`` works too. A callback that
names a ``keepalive`` parameter also receives a function that keeps the
broker connection alive: call it at least every few seconds while waiting for
something slow, such as a person's answer.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Final

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from . import _config, _headers, _names
from ._config import UNSET, BrokerConfig, ConnectionSettings
from ._connection import CONNECTION_ERRORS, close_quietly, connect
from .errors import (
    ConfigurationError,
    DeadLetterQueueNotFoundError,
    DomainEventBrokerError,
    MalformedEventError,
    PublishError,
    translate_pika_error,
)
from .events import DomainEvent

__all__ = [
    "DISCARD",
    "LEAVE",
    "RETRY",
    "DeadLetter",
    "HandlerStatus",
    "QueueStatus",
    "ReplayResult",
    "failure_reason",
    "handler_status",
    "inspect_dead_letters",
    "replay_all",
    "replay_dead_letters",
    "replay_event",
    "retry_event",
]

log = logging.getLogger(__name__)

#: Callback answer: republish the event to the handler's retry exchange.
RETRY: Final = "retry"
#: Callback answer: keep the event in the dead-letter queue.
LEAVE: Final = "leave"
#: Callback answer: remove the event for good.
DISCARD: Final = "discard"

_ACTIONS: Final = frozenset({RETRY, LEAVE, DISCARD})

#: The delay of ``Retry()`` without arguments (seconds); :func:`handler_status`
#: always looks for its delay queue.
DEFAULT_RETRY_DELAY: Final = 10.0

#: Reply code of a passive declaration of something that does not exist.
_NOT_FOUND: Final = 404

MessageCallback = Callable[..., str]
"""A replay callback: called with keyword arguments, returns an action."""


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

    .. versionadded:: 4.0
    """

    replayed: int = 0
    discarded: int = 0
    left: int = 0
    remaining: int = 0

    @property
    def offered(self) -> int:
        """How many events the callback was asked about."""
        return self.replayed + self.discarded + self.left


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered event, as :func:`inspect_dead_letters` saw it.

    Attributes:
        routing_key: the routing key it was dead-lettered with (its event's).
        body: the raw message body.
        properties: the AMQP properties, headers included.
        event: the decoded event, or ``None`` when the body is not one.

    .. versionadded:: 4.0
    """

    routing_key: str
    body: bytes
    properties: pika.BasicProperties = field(repr=False)
    event: DomainEvent | None = field(repr=False)

    @property
    def headers(self) -> Mapping[str, Any]:
        """The message's AMQP headers (empty when it has none)."""
        return self.properties.headers or {}

    @property
    def uuid_string(self) -> str | None:
        """The event's uuid, or the message id of a malformed body."""
        if self.event is not None:
            return self.event.uuid_string
        message_id = self.properties.message_id
        return message_id if isinstance(message_id, str) else None

    @property
    def retry_count(self) -> int:
        """How many retries the handler had asked for before it gave up."""
        return _headers.retry_count(self.headers)

    @property
    def exception_type(self) -> str | None:
        """Qualified class name of the exception that dead-lettered the event."""
        return _text_header(self.headers, _headers.EXCEPTION_TYPE)

    @property
    def exception_message(self) -> str | None:
        """The message of that exception."""
        return _text_header(self.headers, _headers.EXCEPTION_MESSAGE)

    @property
    def exception_traceback(self) -> str | None:
        """Its traceback (possibly truncated)."""
        return _text_header(self.headers, _headers.EXCEPTION_TRACEBACK)

    @property
    def failed_handler(self) -> str | None:
        """The handler that failed."""
        return _text_header(self.headers, _headers.FAILED_HANDLER)

    @property
    def failed_at(self) -> float | None:
        """When it was dead-lettered (Unix seconds), if known.

        From this library's ``x-failed-at`` header, else from RabbitMQ's
        ``x-death`` header (dead letters of 3.0.2).
        """
        value = self.headers.get(_headers.FAILED_AT)
        if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, (str, bytes)):
            try:
                return float(value)
            except ValueError:
                pass
        death = _first_death(self.headers)
        when = death.get("time") if death else None
        if isinstance(when, datetime):
            return when.timestamp()
        return None

    @property
    def reason(self) -> str:
        """Why the event was dead-lettered, in one line."""
        return failure_reason(self.properties)

    def age(self, now: float | None = None) -> float | None:
        """How long ago the event was dead-lettered.

        Args:
            now: the current time (Unix seconds); default: now.

        Returns:
            Seconds since it was dead-lettered, else since it was published,
            or ``None`` when neither is known.
        """
        since = self.failed_at
        if since is None and self.event is not None:
            since = self.event.timestamp
        if since is None:
            return None
        return max(0.0, (time.time() if now is None else now) - since)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-serializable summary (what ``inspect --json`` prints)."""
        return {
            "routing_key": self.routing_key,
            "uuid_string": self.uuid_string,
            "age_seconds": self.age(now),
            "failed_at": self.failed_at,
            "reason": self.reason,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
            "exception_traceback": self.exception_traceback,
            "failed_handler": self.failed_handler,
            "retry_count": self.retry_count,
            "event": None if self.event is None else self.event.event_data,
            "body": None if self.event is not None else self.body.decode("utf-8", "replace"),
        }


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

    .. versionadded:: 4.0
    """

    queue: QueueStatus
    dead_letter_queue: QueueStatus
    delay_queues: tuple[QueueStatus, ...]

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
        }


def failure_reason(properties: pika.BasicProperties | None) -> str:
    """Why a dead letter failed, in one line, from its headers.

    Args:
        properties: the dead letter's AMQP properties.

    Returns:
        ``"<exception type>: <message>"`` when this library dead-lettered it,
        RabbitMQ's reason (e.g. ``"rejected"``) for dead letters of 3.0.2,
        else ``"unknown"``.

    .. versionadded:: 4.0
    """
    headers: Mapping[str, Any] = (properties.headers if properties is not None else None) or {}
    exception_type = _text_header(headers, _headers.EXCEPTION_TYPE)
    if exception_type:
        message = _text_header(headers, _headers.EXCEPTION_MESSAGE)
        first_line = message.strip().splitlines()[0] if message and message.strip() else ""
        return f"{exception_type}: {first_line}" if first_line else exception_type
    death = _first_death(headers)
    if death and death.get("reason"):
        reason = death["reason"]
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        return f"{reason} by queue {_text(death.get('queue')) or '?'} (no exception recorded)"
    return "unknown"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def _text_header(headers: Mapping[str, Any], key: str) -> str | None:
    return _text(headers.get(key))


def _first_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def _decode(body: bytes) -> DomainEvent | None:
    try:
        return DomainEvent.from_json(body)
    except MalformedEventError:
        return None


def _replay_properties(properties: pika.BasicProperties | None) -> pika.BasicProperties:
    """The dead letter's properties for its republished copy: all kept,
    except RabbitMQ's death headers (dropped) and the retry count (reset)."""
    headers = _headers.without_death_headers(properties.headers if properties else None)
    headers.pop(_headers.RETRY_COUNT, None)
    return _headers.copy_properties(properties, headers)


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


# -- the session ----------------------------------------------------------------

#: Replayed copies published per transaction, at most.
BATCH_SIZE: Final = 100
#: A callback slower than this (seconds), or one that takes ``keepalive``
#: (it waits for something, e.g. a person), has each answer carried out at
#: once instead of batched.
SLOW_CALLBACK: Final = 0.05


class _DeadLetterSession:
    """One connection to a handler's dead-letter queue, for a whole run.

    Dead letters are taken with :meth:`get` on one channel and stay
    unacknowledged until :meth:`ack` or :meth:`flush`; leaving the session
    returns all others to the queue, in their places.

    Replayed copies go out on a second, transactional channel, in batches:
    RabbitMQ answers ``tx.commit`` only once every message of the batch is
    routed and, when persistent, written to disk, and it sends the
    ``basic.return`` of an unroutable (mandatory) message before that answer.
    So a dead letter is acknowledged only after its copy is safely in the
    handler's queue, as with publisher confirms, without waiting for the
    disk once per message.
    """

    def __init__(self, name: str, config: BrokerConfig, purpose: str) -> None:
        self.name = name
        self.queue = _names.dead_letter_queue(name)
        self.exchange = _names.retry_exchange(name)
        self._config = config
        self._purpose = purpose
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._publisher: BlockingChannel | None = None
        self._unacked = 0
        self._batch: list[pika.spec.Basic.GetOk] = []
        self._returned: set[str] = set()
        self.count_at_start = 0

    @property
    def unacked(self) -> int:
        """Dead letters taken and neither acknowledged nor returned yet."""
        return self._unacked

    def __enter__(self) -> _DeadLetterSession:
        self._connection = connect(
            self._config, f"domain-event-broker {self._purpose} (pid {os.getpid()})"
        )
        try:
            self._channel = self._connection.channel()
            self.count_at_start = self._declare_passively()
        except BaseException:
            close_quietly(self._connection)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self.return_unacked()
            elif self._unacked:
                # Best effort: closing the connection returns them anyway.
                try:
                    self.return_unacked()
                except DomainEventBrokerError:
                    log.debug("Could not return dead letters before closing", exc_info=True)
        finally:
            # Uncommitted copies are discarded with the channel.
            close_quietly(self._connection)

    def _broker_error(self, exc: BaseException, doing: str) -> DomainEventBrokerError:
        return translate_pika_error(exc, f"{doing} (dead-letter queue {self.queue!r})")

    def _declare_passively(self) -> int:
        assert self._channel is not None
        try:
            frame = self._channel.queue_declare(self.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == _NOT_FOUND:
                raise DeadLetterQueueNotFoundError(
                    f"handler {self.name!r} has no dead-letter queue {self.queue!r} on "
                    f"{self._config.display} (was it registered with dead_letter=True?)"
                ) from exc
            raise self._broker_error(exc, "looking up the queue") from exc
        except CONNECTION_ERRORS as exc:
            raise self._broker_error(exc, "looking up the queue") from exc
        return int(frame.method.message_count)

    def count(self) -> int:
        """Messages ready in the dead-letter queue now."""
        return self._declare_passively()

    def get(self) -> tuple[pika.spec.Basic.GetOk, pika.BasicProperties, bytes] | None:
        """Take the next dead letter, unacknowledged, or ``None`` when empty."""
        assert self._channel is not None
        try:
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=False)
        except CONNECTION_ERRORS as exc:
            raise self._broker_error(exc, "reading a dead letter") from exc
        if method is None:
            return None
        self._unacked += 1
        return method, properties, body

    def _publishing_channel(self) -> BlockingChannel:
        if self._publisher is None:
            assert self._connection is not None
            doing = f"replaying to exchange {self.exchange!r}"
            try:
                channel = self._connection.channel()
                # Fail clearly and early if the exchange is missing: a publish
                # to it would close the channel without telling why.
                channel.exchange_declare(self.exchange, passive=True)
                channel.tx_select()
                channel.add_on_return_callback(self._on_returned)
            except CONNECTION_ERRORS as exc:
                raise self._publish_error(exc, doing) from exc
            self._publisher = channel
        return self._publisher

    def _on_returned(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Return,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        # The retry exchange is a topic exchange: whether a copy is routable
        # depends on its routing key only.
        self._returned.add(method.routing_key)

    def republish(
        self, frame: pika.spec.Basic.GetOk, properties: pika.BasicProperties, body: bytes
    ) -> None:
        """Publish a copy to the handler's retry exchange, in the current
        batch; the dead letter is acknowledged when the batch is committed."""
        channel = self._publishing_channel()
        try:
            channel.basic_publish(
                exchange=self.exchange,
                routing_key=frame.routing_key,
                body=body,
                properties=_replay_properties(properties),
                mandatory=True,
            )
        except CONNECTION_ERRORS as exc:
            raise self._publish_error(exc, f"replaying {frame.routing_key!r}") from exc
        self._batch.append(frame)

    @property
    def batch_size(self) -> int:
        """Copies published and not committed yet."""
        return len(self._batch)

    def flush(self) -> None:
        """Commit the current batch, then acknowledge the dead letters whose
        copies were routed.

        Raises:
            PublishError: some copies could not be routed, or the retry
                exchange does not exist; their dead letters stay in place.
            BrokerError: the commit failed; the batch's dead letters stay.
        """
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        assert self._publisher is not None and self._connection is not None
        doing = f"replaying {len(batch)} event(s) to exchange {self.exchange!r}"
        try:
            self._publisher.tx_commit()
            # Dispatch the basic.return frames that came before commit-ok.
            self._connection.process_data_events(0)
        except CONNECTION_ERRORS as exc:
            raise self._publish_error(exc, doing) from exc
        returned, self._returned = self._returned, set()
        for frame in batch:
            if frame.routing_key not in returned:
                self.ack(frame)
        if returned:
            keys = ", ".join(repr(key) for key in sorted(returned))
            raise PublishError(
                f"{doing}: no queue is bound for routing key(s) {keys} (does the handler's "
                f"queue {self.name!r} still exist?); those dead letters were left in place"
            )

    def _publish_error(self, exc: BaseException, doing: str) -> DomainEventBrokerError:
        """The library error for a failed publish or commit; the channel is
        gone with its uncommitted copies, the dead letters stay."""
        self._publisher = None
        self._batch = []
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == _NOT_FOUND:
            return PublishError(
                f"{doing}: the exchange does not exist; the dead letters were left in place"
            )
        return self._broker_error(exc, doing)

    def ack(self, frame: pika.spec.Basic.GetOk) -> None:
        """Remove a dead letter taken with :meth:`get`."""
        assert self._channel is not None
        try:
            self._channel.basic_ack(frame.delivery_tag)
        except CONNECTION_ERRORS as exc:
            raise self._broker_error(exc, "acknowledging a dead letter") from exc
        self._unacked -= 1

    def return_unacked(self) -> None:
        """Put every dead letter taken and not acknowledged back in its place."""
        if not self._unacked or self._channel is None or not self._channel.is_open:
            return
        try:
            # delivery tag 0 with multiple: every unacknowledged message.
            self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
        except CONNECTION_ERRORS as exc:
            raise self._broker_error(exc, "returning dead letters") from exc
        self._unacked = 0

    def keepalive(self) -> None:
        """Service the connection (heartbeats) while the caller waits."""
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(0)
        except CONNECTION_ERRORS as exc:
            raise self._broker_error(exc, "keeping the connection alive") from exc


# -- replay ---------------------------------------------------------------------


def _run(
    name: str,
    message_callback: MessageCallback,
    config: BrokerConfig,
    limit: int | None,
    on_progress: Callable[[ReplayResult, int], None] | None,
) -> ReplayResult:
    wanted = _callback_arguments(message_callback)
    # A callback that waits (for a person, say) has each answer carried out
    # at once, before it is asked about the next event.
    interactive = "keepalive" in wanted
    replayed = discarded = left = 0
    with _DeadLetterSession(name, config, "replay") as session:
        # Bounded by the count at the start: events dead-lettered during the
        # run, and events left (held unacknowledged until the end), are never
        # offered twice.
        total = session.count_at_start if limit is None else min(limit, session.count_at_start)
        log.info("Replaying up to %d dead letter(s) from %s", total, session.queue)
        try:
            for _ in range(total):
                message = session.get()
                if message is None:
                    break
                frame, properties, body = message
                arguments: dict[str, Any] = {"frame": frame, "header": properties, "body": body}
                if "event" in wanted:
                    arguments["event"] = _decode(body)
                arguments["keepalive"] = session.keepalive
                started = time.monotonic()
                action = message_callback(
                    **{key: value for key, value in arguments.items() if key in wanted}
                )
                slow = interactive or time.monotonic() - started > SLOW_CALLBACK
                if action == RETRY:
                    session.republish(frame, properties, body)
                    replayed += 1
                    log.debug("Replaying %s to %s", frame.routing_key, session.exchange)
                    if slow or session.batch_size >= BATCH_SIZE:
                        session.flush()
                elif action == DISCARD:
                    session.ack(frame)
                    discarded += 1
                    log.info("Discarded a dead letter %s", frame.routing_key)
                elif action == LEAVE:
                    left += 1
                else:
                    raise ValueError(
                        f"the replay callback returned {action!r}; expected RETRY, LEAVE or "
                        f"DISCARD (the event was left in the dead-letter queue)"
                    )
                if on_progress is not None:
                    on_progress(ReplayResult(replayed, discarded, left), total)
        except Exception as exc:
            if not isinstance(exc, DomainEventBrokerError):
                # Carry out what the callback answered before.
                try:
                    session.flush()
                except DomainEventBrokerError:
                    log.warning("Replaying the events answered before failed", exc_info=True)
            raise
        session.flush()
        log.info(
            "Replayed %d, discarded %d, left %d dead letter(s) of %s",
            replayed,
            discarded,
            left,
            session.queue,
        )
        # Requeueing is asynchronous on the broker: count the queue before,
        # then add the events left, which are about to return to it.
        remaining = session.count() + session.unacked
        session.return_unacked()
    return ReplayResult(replayed, discarded, left, remaining)


def replay_dead_letters(
    name: str,
    message_callback: MessageCallback = retry_event,
    connection_settings: ConnectionSettings = UNSET,
    *,
    limit: int | None = None,
    on_progress: Callable[[ReplayResult, int], None] | None = None,
) -> ReplayResult:
    """Offer the dead letters of handler ``name`` to ``message_callback``,
    and do what it answers, over one connection.

    Events are offered oldest first, each at most once per call: the run
    covers the messages in the dead-letter queue when it starts (or the
    first ``limit`` of them).

    Args:
        name: the handler (queue) name given to ``Subscriber.register``.
        message_callback: called with keyword arguments (see the module
            documentation); returns :data:`RETRY`, :data:`LEAVE` or
            :data:`DISCARD`.
        connection_settings: an AMQP URL or list of URLs; left out: the
            configured default.
        limit: offer at most this many events; ``None`` for all.
        on_progress: called after each event with the counts so far and the
            number of events the run covers.

    Returns:
        The counts of the run; with ``connection_settings=None`` all zero.

    Raises:
        ValueError: the callback returned something else (that event and the
            events left so far stay in the dead-letter queue).
        DeadLetterQueueNotFoundError: ``name`` has no dead-letter queue;
            nothing was created on the broker.
        PublishError: a replayed event could not be routed or was refused;
            it stays in the dead-letter queue.
        BrokerError: talking to the broker failed.

    .. versionadded:: 4.0
    """
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, not {limit!r}")
    config = _config.resolve(connection_settings)
    if config is None:
        return ReplayResult()
    return _run(name, message_callback, config, limit, on_progress)


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
        PublishError: the replayed event could not be routed or was refused;
            it stays in the dead-letter queue.
        BrokerError: talking to the broker failed.
    """
    config = _config.resolve(connection_settings)
    if config is None:
        return 0
    result = _run(queue_name, message_callback, config, 1, None)
    return max(0, result.remaining - result.left)


def replay_all(
    queue_name: str,
    message_callback: MessageCallback = retry_event,
    connection_settings: ConnectionSettings = UNSET,
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

    Returns:
        The number of messages in the dead-letter queue when the run ended:
        the events left plus any dead-lettered meanwhile.

    Raises:
        ValueError: the callback returned something else; that event and the
            events left so far stay in the dead-letter queue.
        DeadLetterQueueNotFoundError: ``queue_name`` has no dead-letter queue.
        PublishError: a replayed event could not be routed or was refused;
            it stays in the dead-letter queue.
        BrokerError: talking to the broker failed.
    """
    return replay_dead_letters(queue_name, message_callback, connection_settings).remaining


# -- looking without touching -------------------------------------------------


def inspect_dead_letters(
    name: str,
    connection_settings: ConnectionSettings = UNSET,
    *,
    limit: int | None = 20,
) -> list[DeadLetter]:
    """The oldest dead letters of handler ``name``, left in place.

    The messages are taken unacknowledged and returned to the queue, in
    their places, before this function returns (RabbitMQ marks them
    redelivered).

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
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, not {limit!r}")
    config = _config.resolve(connection_settings)
    if config is None:
        return []
    letters: list[DeadLetter] = []
    with _DeadLetterSession(name, config, "inspect") as session:
        total = session.count_at_start if limit is None else min(limit, session.count_at_start)
        for _ in range(total):
            message = session.get()
            if message is None:
                break
            frame, properties, body = message
            letters.append(
                DeadLetter(
                    routing_key=frame.routing_key,
                    body=body,
                    properties=properties,
                    event=_decode(body),
                )
            )
    return letters


def handler_status(
    name: str,
    connection_settings: ConnectionSettings = UNSET,
    *,
    delays: Iterable[float] = (),
) -> HandlerStatus:
    """Message and consumer counts of handler ``name``'s queues.

    Nothing is created on the broker. AMQP cannot list queues, so delay
    queues are looked up by delay: the default ``Retry()`` delay and the
    ``delays`` given.

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
    milliseconds = sorted({_names.delay_ms(delay) for delay in (DEFAULT_RETRY_DELAY, *delays)})
    queues = [
        name,
        _names.dead_letter_queue(name),
        *(queue for ms in milliseconds for queue in _names.delay_queues(name, ms)),
    ]
    connection = connect(config, f"domain-event-broker status (pid {os.getpid()})")
    try:
        statuses = [_queue_status(connection, queue) for queue in queues]
    except CONNECTION_ERRORS as exc:
        raise translate_pika_error(exc, f"reading the status of {name!r}") from exc
    finally:
        close_quietly(connection)
    delay_statuses = tuple(status for status in statuses[2:] if status.exists)
    return HandlerStatus(statuses[0], statuses[1], delay_statuses)


def _queue_status(connection: pika.BlockingConnection, queue: str) -> QueueStatus:
    # A failed passive declaration closes the channel: one channel per queue.
    channel = connection.channel()
    try:
        frame = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == _NOT_FOUND:
            return QueueStatus(queue, None, None)
        raise
    if channel.is_open:
        channel.close()
    return QueueStatus(queue, int(frame.method.message_count), int(frame.method.consumer_count))
