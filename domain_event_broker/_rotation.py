"""Walking once through a dead-letter queue without holding it.

A run visits the messages that were in ``<name>-dl`` when it started, oldest
first, each exactly once, and carries out one action per message:

* ``RETRY``: a copy goes to the handler's retry exchange; the dead letter is
  acknowledged.
* ``DISCARD``: the dead letter is acknowledged.
* ``LEAVE`` (and ``SKIP``, for messages a filter passed over): a copy goes
  to the tail of the same queue (default exchange, routing key = the queue's
  name, every property and header kept, the dead letter's own routing key in
  a header); the dead letter is acknowledged.

The copies and the acknowledgements of one batch are published in one AMQP
transaction on one channel. For ``LEAVE``, ``SKIP`` and ``DISCARD`` the
transaction touches one queue only, so it is atomic: a connection lost
before ``tx.commit-ok`` leaves either all of the batch done or none of it.
A ``RETRY`` copy is routed to the handler's queue; it goes in the same
transaction once this run has seen its routing key routed (RabbitMQ applies
a committed transaction as a whole, so a lost connection cannot separate a
copy from its acknowledgement). The first event of each routing key is a
probe: its copy is committed first, with ``mandatory`` set, and its dead
letter acknowledged only once the copy was routed; an unroutable copy leaves
its dead letter in place (moved to the tail, counted as unroutable).

Dead letters are consumed with a prefetch of two batches (:data:`PREFETCH`):
the broker sends the next batch while this one is decided, and at most that
many are unacknowledged at any time,
whatever the queue's length; nothing is requeued in bulk at the end (which
RabbitMQ does in time growing faster than linearly, blocking the queue);
events dead-lettered during the run land behind the copies made so far and
are not visited, because the run stops after the count it read at the start.

**Lost connections.** When the connection (or the channel, e.g. after the
broker's ``consumer_timeout``) is lost, the run reconnects and reconciles:
RabbitMQ returns the batch's dead letters to the head of the queue unless
their transaction was committed. If the first message at the head is the
batch's first dead letter (same body, routing key and properties, marked
redelivered), the batch was not carried out and is carried out again with
the answers already given; otherwise it was, and the run goes on. Nothing is
lost and nothing already done is done again. Two windows remain: a probe
copy (the first event of a routing key) whose commit was under way when the
connection was lost may have reached the handler, and is published again;
and a dead letter whose copy came back unroutable although its key was
routed earlier in the run (the handler's queue was unbound meanwhile) is put
back with a second commit, which a connection lost at that moment may make
happen twice. Only a process killed between two commits loses what it held
in memory in that second case; what the broker holds is never lost.

What the transaction does not cover: RabbitMQ documents that a *broker*
failure during ``tx.commit`` may leave a transaction that spans two queues
(a RETRY copy into the handler's queue, the acknowledgement in ``-dl``)
partly applied. A node crash in the few milliseconds of a commit could thus
persist the acknowledgement without the copy. The alternative (commit the
copies first, acknowledge in a second transaction) closes that window but
opens another: a connection lost during the first commit leaves the copies'
fate unknown, so up to a batch would be replayed twice. Client-side losses
are far more common than node crashes mid-commit, so this module chose the
single transaction.

After a reconnection the run first waits until the queue has no consumer:
until the broker noticed that the old connection is gone and put back what
it held (at once for a closed socket; within two heartbeat intervals for a
silent network).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from . import _instrument, _names
from ._config import BrokerConfig
from ._connection import CONNECTION_ERRORS, close_quietly, connect
from ._deadletters import DELIVERY_COUNT, logical_view, parked_properties
from ._rotation_items import DISCARD, LEAVE, RETRY, SKIP, Counts, Item, replay_properties
from .errors import (
    BrokerError,
    DeadLetterQueueNotFoundError,
    DomainEventBrokerError,
    is_auth_error,
    translate_pika_error,
)

__all__ = [
    "BATCH_SIZE",
    "DISCARD",
    "LEAVE",
    "RETRY",
    "SKIP",
    "Counts",
    "Item",
    "Session",
    "replay_properties",
]

log = logging.getLogger(__name__)

#: Dead letters carried out per transaction, at most (and so held
#: unacknowledged at most, plus the one being decided).
BATCH_SIZE: Final = 100
#: Dead letters the broker may send ahead of the one being visited: the
#: batch being decided plus the next one (acknowledgements in a transaction
#: free their place only when it is committed).
PREFETCH: Final = 2 * BATCH_SIZE
#: Seconds without a delivery after which the queue is checked for being
#: empty (it is, when it has fewer messages than counted at the start).
IDLE_WAIT: Final = 0.5
#: Seconds without a delivery, although the queue has ready messages, after
#: which a run gives up.
STALL_TIMEOUT: Final = 60.0
#: Seconds to wait, beyond two heartbeat intervals (the longest the broker
#: takes to notice a silently lost connection), for it to release the dead
#: letters that connection held.
RELEASE_MARGIN: Final = 30.0
#: Seconds between two looks at whether they were released.
RELEASE_POLL: Final = 0.2
#: Reconnections in a row, without a committed batch in between, before a
#: run gives up.
MAX_RECOVERIES: Final = 5

#: Reply code of a passive declaration of something that does not exist.
NOT_FOUND: Final = 404
#: Reply code of a channel closed by the broker's ``consumer_timeout``.
_PRECONDITION_FAILED: Final = 406


def _recoverable(exc: BaseException) -> bool:
    """Whether reconnecting can help: a lost connection or the broker's
    consumer timeout, not a refusal or a missing queue."""
    if is_auth_error(exc):
        return False
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return exc.reply_code == _PRECONDITION_FAILED and "timed out" in str(exc.reply_text)
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return exc.reply_code in (320, 541)  # forced close, internal error
    return isinstance(
        exc,
        (
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.StreamLostError,
            pika.exceptions.ConnectionWrongStateError,
            pika.exceptions.ChannelWrongStateError,
            pika.exceptions.ChannelClosed,
            ConnectionError,
            OSError,
        ),
    )


def _same_message(taken: Item | None, item: Item) -> bool:
    """Whether ``taken`` is ``item`` come back after a lost connection."""
    if taken is None or not taken.frame.redelivered:
        return False
    if taken.body != item.body or taken.frame.routing_key != item.frame.routing_key:
        return False
    return _comparable(taken.properties) == _comparable(item.properties)


def _comparable(properties: pika.BasicProperties | None) -> dict[str, Any]:
    if properties is None:
        return {}
    values = dict(vars(properties))
    headers = values.get("headers")
    if headers and DELIVERY_COUNT in headers:
        values["headers"] = {k: v for k, v in headers.items() if k != DELIVERY_COUNT}
    return values


class Session:
    """One run over a handler's dead-letter queue (see the module docs).

    Args:
        name: the handler name.
        config: the broker settings.
        purpose: shown in the connection's name.
        on_done: called with each item once its action is committed.
        before_commit: called before each commit (e.g. to flush an export).
        prefetch: dead letters the broker may send ahead, unacknowledged.
    """

    def __init__(
        self,
        name: str,
        config: BrokerConfig,
        purpose: str,
        *,
        on_done: Callable[[Item], None] | None = None,
        before_commit: Callable[[], None] | None = None,
        prefetch: int = PREFETCH,
    ) -> None:
        self.name = name
        self.queue = _names.dead_letter_queue(name)
        self.exchange = _names.retry_exchange(name)
        self.counts = Counts()
        self.count_at_start = 0
        self._config = config
        self._purpose = purpose
        self._on_done = on_done
        self._before_commit = before_commit
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._prefetch = prefetch
        #: Delivered by the broker, not taken yet.
        self._deliveries: deque[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes]]
        self._deliveries = deque()
        self._consumer_tag: str | None = None
        #: Taken and not committed yet, in the order taken.
        self._held: list[Item] = []
        self._pending = 0
        #: A message taken while reconciling, to hand out next.
        self._lookahead: Item | None = None
        self._returned: list[tuple[str, str]] = []
        #: Routing keys this run has seen routed by the retry exchange.
        self._routable: set[str] = set()
        self._exchange_checked = False
        self._exchange_missing: BaseException | None = None
        self._recoveries = 0
        #: Acknowledged dead letters whose copy came back: to put back.
        self._to_repark: list[Item] = []

    @property
    def channel(self) -> BlockingChannel:
        """The session's (transactional) channel."""
        assert self._channel is not None
        return self._channel

    @property
    def exchange_error(self) -> BaseException | None:
        """pika's error when the retry exchange turned out to be missing."""
        return self._exchange_missing

    # -- connection ------------------------------------------------------------

    def __enter__(self) -> Session:
        self._open()
        try:
            self.count_at_start = self.count()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Whatever is not committed returns to its place with the channel.
        self.close()

    def close(self) -> None:
        """Close the connection; uncommitted work is undone by the broker."""
        if self._connection is not None:
            close_quietly(self._connection)
        self._connection = self._channel = None

    def _open(self) -> None:
        connection = connect(
            self._config, f"domain-event-broker {self._purpose} (pid {os.getpid()})"
        )
        try:
            channel = connection.channel()
            channel.tx_select()
            channel.basic_qos(prefetch_count=self._prefetch)
            channel.add_on_return_callback(self._on_returned)
        except CONNECTION_ERRORS as exc:
            close_quietly(connection)
            raise self._error(exc, "opening a channel") from exc
        self._connection, self._channel = connection, channel
        # Deliveries of the old channel are back in the queue.
        self._deliveries.clear()
        self._consumer_tag = None

    def _error(self, exc: BaseException, doing: str) -> DomainEventBrokerError:
        return translate_pika_error(exc, f"{doing} (dead-letter queue {self.queue!r})")

    def _on_returned(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Return,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._returned.append((method.exchange, method.routing_key))

    def count(self) -> int:
        """Messages ready in the dead-letter queue now.

        Raises:
            DeadLetterQueueNotFoundError: the queue does not exist.
            BrokerError: talking to the broker failed.
        """
        assert self._connection is not None
        try:
            # A failed passive declaration closes its channel: a spare one.
            channel = self._connection.channel()
            frame = channel.queue_declare(self.queue, passive=True)
            channel.close()
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == NOT_FOUND:
                raise DeadLetterQueueNotFoundError(
                    f"handler {self.name!r} has no dead-letter queue {self.queue!r} on "
                    f"{self._config.display} (was it registered with dead_letter=True?)"
                ) from exc
            raise self._error(exc, "looking up the queue") from exc
        except CONNECTION_ERRORS as exc:
            raise self._error(exc, "looking up the queue") from exc
        return int(frame.method.message_count)

    def stop_taking(self) -> None:
        """Tell the broker to send no more dead letters (before the last
        :meth:`flush`, whose commit would otherwise make room for more)."""
        if self._consumer_tag is None:
            return
        try:
            assert self._channel is not None
            self._channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        except CONNECTION_ERRORS as exc:
            self._recover(exc, committing=False)

    def finish(self) -> int:
        """Stop taking dead letters, return those the broker sent ahead (at
        most :data:`PREFETCH`, behind everything visited) to their places,
        and count the dead-letter queue.

        Call after the last :meth:`flush`.

        Returns:
            The messages in the dead-letter queue now.
        """
        while True:
            try:
                assert self._channel is not None
                if self._consumer_tag is not None:
                    self._channel.basic_cancel(self._consumer_tag)
                    self._consumer_tag = None
                # Delivery tag 0 with multiple: every unacknowledged message.
                self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
                self._channel.tx_commit()
                self._deliveries.clear()
                # On the same channel, so counted after the requeue.
                frame = self._channel.queue_declare(self.queue, passive=True)
                return int(frame.method.message_count)
            except CONNECTION_ERRORS as exc:
                if self._held:
                    raise
                # Nothing held: a fresh connection has nothing to return.
                self._recover(exc, committing=False)

    # -- taking ------------------------------------------------------------------

    def get(self) -> Item | None:
        """Take the next dead letter, or ``None`` when the queue is empty."""
        while True:
            taken: Item | None
            if self._lookahead is not None:
                taken, self._lookahead = self._lookahead, None
            else:
                try:
                    taken = self._take()
                except CONNECTION_ERRORS as exc:
                    self._recover(exc, committing=False)
                    continue
            if taken is not None:
                self._held.append(taken)
            return taken

    def _take(self) -> Item | None:
        assert self._channel is not None and self._connection is not None
        if self._consumer_tag is None:
            # Started only now, after the count at the start was read.
            self._consumer_tag = self._channel.basic_consume(self.queue, self._on_delivery)
        idle = 0.0
        while not self._deliveries:
            self._connection.process_data_events(time_limit=IDLE_WAIT)
            if self._deliveries:
                break
            idle += IDLE_WAIT
            ready = self.count()
            if ready == 0 and idle >= 2 * IDLE_WAIT:
                return None  # fewer messages than counted: someone else took some
            if idle >= STALL_TIMEOUT:
                raise BrokerError(
                    f"the broker sent no dead letter of {self.queue!r} for {STALL_TIMEOUT:g} s "
                    f"although {ready} are ready"
                )
        method, properties, body = self._deliveries.popleft()
        key, logical = logical_view(method.routing_key, properties)
        return Item(method, properties, body, key, logical)

    def _on_delivery(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._deliveries.append((method, properties, body))

    def keepalive(self) -> None:
        """Service the connection (heartbeats) while the caller waits; if it
        was lost meanwhile, reconnect and take the held dead letters again."""
        try:
            assert self._connection is not None and self._channel is not None
            self._connection.process_data_events(0)
            if self._channel.is_closed:
                raise pika.exceptions.ChannelClosed(0, "closed while waiting")
        except CONNECTION_ERRORS as exc:
            reason = getattr(self._channel, "_closing_reason", None)
            self._recover(reason if isinstance(reason, BaseException) else exc, committing=False)

    # -- carrying out ------------------------------------------------------------

    def decide(self, item: Item, action: str) -> None:
        """Set what to do with ``item``, taken with :meth:`get`."""
        if item.action is None:
            self._pending += 1
        item.action = action

    @property
    def pending(self) -> int:
        """Dead letters decided and not committed yet."""
        return self._pending

    def flush(self) -> None:
        """Carry out every decided dead letter, in one transaction.

        Raises:
            BrokerError: the broker failed in a way reconnecting cannot help.
        """
        while self._pending or self._to_repark:
            try:
                if self._to_repark:
                    self._repark()
                    continue
                self._commit()
            except CONNECTION_ERRORS as exc:
                if self._is_missing_exchange(exc):
                    self._exchange_missing = exc
                    self._recover(exc, committing=False, counted=False)
                    continue
                self._recover(exc, committing=self._committing)

    _committing = False

    def _is_missing_exchange(self, exc: BaseException) -> bool:
        return (
            isinstance(exc, pika.exceptions.ChannelClosedByBroker)
            and exc.reply_code == NOT_FOUND
            and self.exchange in str(exc.reply_text)
        )

    def _check_exchange(self) -> None:
        """Find out once whether the retry exchange exists (a publish to a
        missing exchange would close the channel without saying why)."""
        if self._exchange_checked:
            return
        assert self._connection is not None
        channel = self._connection.channel()
        try:
            channel.exchange_declare(self.exchange, passive=True)
            channel.close()
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            self._exchange_missing = exc
        self._exchange_checked = True

    def _publish_copy(self, item: Item) -> None:
        assert self._channel is not None
        copy = replay_properties(item.logical)
        headers = dict(copy.headers or {})
        with _instrument.replay_span(copy.message_id, self.exchange, item.routing_key, headers):
            copy.headers = headers or None  # with the replay span's trace context
            self._channel.basic_publish(
                exchange=self.exchange,
                routing_key=item.routing_key,
                body=item.body,
                properties=copy,
                mandatory=True,
            )

    def _park(self, item: Item) -> None:
        assert self._channel is not None
        self._channel.basic_publish(
            exchange="",
            routing_key=self.queue,
            body=item.body,
            properties=parked_properties(item.logical, item.routing_key),
            mandatory=True,
        )

    def _commit_now(self) -> list[tuple[str, str]]:
        assert self._channel is not None and self._connection is not None
        self._returned = []
        self._channel.tx_commit()
        # Dispatch the basic.return frames that came before commit-ok.
        self._connection.process_data_events(0)
        returned, self._returned = self._returned, []
        return returned

    def _commit(self) -> None:
        items = [item for item in self._held if item.action is not None]
        retries = [item for item in items if item.action == RETRY and not item.unroutable]
        if retries:
            self._check_exchange()
            if self._exchange_missing is not None:
                for item in retries:
                    self._mark_unroutable(item, f"the exchange {self.exchange!r} does not exist")
                retries = []
        # 1. Probes: the first copy of each routing key this run has not
        #    seen routed, committed on its own; its dead letter stays held.
        probes = [
            item for item in retries if not item.copied and item.routing_key not in self._routable
        ]
        if probes:
            for item in probes:
                self._publish_copy(item)
            returned = {key for exchange, key in self._commit_now() if exchange == self.exchange}
            for item in probes:
                if item.routing_key in returned:
                    self._mark_unroutable(item, "no queue is bound for routing key")
                else:
                    item.copied = True
                    self._routable.add(item.routing_key)
        # 2. Everything else, and the acknowledgements, in one transaction.
        assert self._channel is not None
        for item in items:
            if item.action == RETRY and not item.unroutable:
                if not item.copied:
                    self._publish_copy(item)
            elif item.action != DISCARD:
                self._park(item)
            self._channel.basic_ack(item.frame.delivery_tag)
        if self._before_commit is not None:
            self._before_commit()
        self._committing = True
        returned_list = self._commit_now()
        self._committing = False
        self._done(items)
        if returned_list:
            self._after_late_returns(items, returned_list)

    def _mark_unroutable(self, item: Item, reason: str) -> None:
        item.unroutable = True
        self.counts.unroutable_reasons.setdefault(reason, set()).add(item.routing_key)

    def _done(self, items: list[Item]) -> None:
        done = {id(item) for item in items}
        self._held = [item for item in self._held if id(item) not in done]
        self._pending -= len(items)
        self._recoveries = 0
        counts = self.counts
        for item in items:
            if item.action == RETRY:
                if item.unroutable:
                    counts.unroutable += 1
                else:
                    counts.replayed += 1
            elif item.action == DISCARD:
                counts.discarded += 1
            elif item.action == LEAVE:
                counts.left += 1
            else:
                counts.skipped += 1
            if self._on_done is not None:
                self._on_done(item)

    def _after_late_returns(self, items: list[Item], returned: list[tuple[str, str]]) -> None:
        """Copies returned although their routing key was routed earlier in
        this run (the handler's queue was unbound meanwhile): their dead
        letters were acknowledged with them, so put them back (at the tail)."""
        if any(exchange == "" for exchange, _ in returned):
            raise BrokerError(
                f"the dead-letter queue {self.queue!r} was deleted during the run, "
                "with the dead letters it held"
            )
        keys = {key for _, key in returned}
        lost = [
            item
            for item in items
            if item.action == RETRY
            and not item.unroutable
            and not item.copied
            and item.routing_key in keys
        ]
        for item in lost:
            self._routable.discard(item.routing_key)
            self._mark_unroutable(item, "no queue is bound for routing key")
            self.counts.replayed -= 1
            self.counts.unroutable += 1
        # Kept in memory until committed, also across a reconnection (if the
        # connection goes during that commit, they may be put back twice).
        self._to_repark = lost
        self._repark()
        log.warning(
            "%d replayed cop(ies) to %s came back unroutable; their dead letters were put back "
            "at the tail of %s",
            len(lost),
            self.exchange,
            self.queue,
        )

    def _repark(self) -> None:
        for item in self._to_repark:
            self._park(item)
        self._commit_now()
        self._to_repark = []

    # -- recovering ------------------------------------------------------------

    def _wait_for_release(self) -> None:
        """Wait until the broker noticed that the old connection is gone and
        put its unacknowledged dead letters back: until the queue has no
        consumer (a broker that missed the loss notices it within two
        heartbeat intervals)."""
        timeout = 2 * (self._config.heartbeat or 60.0) + RELEASE_MARGIN
        deadline = time.monotonic() + timeout
        assert self._connection is not None
        while True:
            channel = self._connection.channel()
            consumers = int(channel.queue_declare(self.queue, passive=True).method.consumer_count)
            channel.close()
            if consumers == 0:
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{self.queue!r} still has {consumers} consumer(s) {timeout:g} s after "
                    "the connection was lost; the dead letters this run held are still reserved "
                    "(is another replay running?); nothing taken was lost"
                )
            self._connection.sleep(RELEASE_POLL)

    def _recover(self, exc: BaseException, *, committing: bool, counted: bool = True) -> None:
        """Reconnect after ``exc`` and take the held dead letters again (or
        learn that their transaction was committed)."""
        self._committing = False
        if counted:
            if not _recoverable(exc):
                raise self._error(exc, "replaying") from exc
            self._recoveries += 1
            if self._recoveries > MAX_RECOVERIES:
                raise self._error(exc, f"giving up after {MAX_RECOVERIES} reconnections") from exc
            log.warning("Lost the connection to %s (%r); reconnecting", self.queue, exc)
        self.close()
        self._open()
        # Also when nothing is held: what the broker sent ahead must be back
        # at the head before this run takes anything more.
        self._wait_for_release()
        held = self._held
        if not held:
            return
        try:
            first = self._take()
            decided = [item for item in held if item.action is not None]
            if committing and decided and not _same_message(first, decided[0]):
                # The broker committed the batch before the connection went.
                self._done(decided)
                log.info("The batch in flight had been committed: nothing to do again")
                held = self._held  # an undecided one, if any
                if not held:
                    self._lookahead = first
                    return
            for index, item in enumerate(held):
                again = first if index == 0 else self._take()
                if not _same_message(again, item):
                    raise BrokerError(
                        f"the dead letters this run held did not come back to the head of "
                        f"{self.queue!r} (is another replay running?); stopping, nothing "
                        "taken was lost"
                    )
                assert again is not None
                item.frame = again.frame
                item.properties = again.properties
        except CONNECTION_ERRORS as again_exc:
            self._recover(again_exc, committing=committing)
