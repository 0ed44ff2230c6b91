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
its dead letter in place (moved to the tail, counted as unroutable). Probes
are committed on a transactional channel of their own, which holds no dead
letter, so that the broker's consumer timeout (which closes the consuming
channel before RabbitMQ 4.3) cannot close it while a probe's commit waits
for the handler's queue, leaving the copy's fate unknown.

Dead letters are consumed with a prefetch of two batches (:data:`PREFETCH`):
the broker sends the next batch while this one is decided, and at most that
many are unacknowledged at any time,
whatever the queue's length; nothing is requeued in bulk at the end (which
RabbitMQ does in time growing faster than linearly, blocking the queue);
events dead-lettered during the run land behind the copies made so far and
are not visited, because the run stops after the count it read at the start.

**Lost connections.** When the connection (or the channel, e.g. after the
broker's ``consumer_timeout``) is lost, or the broker cancels the run's
consumer (a quorum queue's ``consumer_timeout`` from RabbitMQ 4.3 on, which
puts the dead letters back and ignores their acknowledgements: the run never
commits after such a cancel), the run reconnects and reconciles:
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

The run is in three pieces: :class:`Session` (this module) holds what was
taken and decided and recovers after a lost connection;
:class:`.run_commit.Committer` carries out a batch (probes, copies,
parking, the commit, putting back late returns);
:class:`.run_channel.RunChannel` is the connection and its
transactional channel. :mod:`.run_items` has what they share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import names as _names
from .._amqp.config import BrokerConfig
from .._amqp.connect import CONNECTION_ERRORS
from .._amqp.failures import is_auth_error, is_consumer_timeout
from ..errors import BrokerError
from .letters import REDELIVERY_HEADERS
from .run_channel import CANCELLED_WHY, RunChannel
from .run_commit import Committer
from .run_items import DISCARD, LEAVE, RETRY, SKIP, Counts, Item, replay_properties

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
#: Reconnections in a row, without a committed batch in between, before a
#: run gives up.
MAX_RECOVERIES: Final = 5


def _recoverable(exc: BaseException) -> bool:
    """Whether reconnecting can help: a lost connection or the broker's
    consumer timeout (a closed channel before RabbitMQ 4.3, a cancelled
    consumer from 4.3 on), not a refusal or a missing queue."""
    if is_auth_error(exc):
        return False
    if isinstance(exc, pika.exceptions.ConsumerCancelled):
        return True
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        return is_consumer_timeout(exc)
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        return exc.reply_code in (pika.spec.CONNECTION_FORCED, pika.spec.INTERNAL_ERROR)
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
    if headers and REDELIVERY_HEADERS.intersection(headers):
        kept = {k: v for k, v in headers.items() if k not in REDELIVERY_HEADERS}
        values["headers"] = kept or None  # as the first delivery had none
    return values


class Session:
    """One run over a handler's dead-letter queue (see the module docs).

    The session holds what the run took and decided, hands it to its
    :class:`.run_commit.Committer`, and recovers when its
    :class:`.run_channel.RunChannel` loses the connection.

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
        self._on_done = on_done
        self._wire = RunChannel(name, config, purpose, prefetch)
        self._committer = Committer(
            self._wire, self.exchange, self.counts, self._done, before_commit
        )
        #: Taken and not committed yet, in the order taken.
        self._held: list[Item] = []
        self._pending = 0
        #: A message taken while reconciling, to hand out next.
        self._lookahead: Item | None = None
        self._recoveries = 0

    @property
    def channel(self) -> BlockingChannel:
        """The session's (transactional) channel."""
        return self._wire.channel

    @property
    def exchange_error(self) -> BaseException | None:
        """pika's error when the retry exchange turned out to be missing."""
        return self._committer.exchange_missing

    # -- connection ------------------------------------------------------------

    def __enter__(self) -> Session:
        self._wire.open()
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
        self._wire.close()

    def count(self) -> int:
        """Messages ready in the dead-letter queue now.

        Raises:
            DeadLetterQueueNotFoundError: the queue does not exist.
            BrokerError: talking to the broker failed.
        """
        return self._wire.count()

    def stop_taking(self) -> None:
        """Tell the broker to send no more dead letters (before the last
        :meth:`flush`, whose commit would otherwise make room for more)."""
        try:
            self._wire.stop_consuming()
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
                return self._wire.return_unacknowledged()
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
                    taken = self._wire.take()
                except CONNECTION_ERRORS as exc:
                    self._recover(exc, committing=False)
                    continue
            if taken is not None:
                self._held.append(taken)
            return taken

    def keepalive(self) -> None:
        """Service the connection (heartbeats) while the caller waits; if it
        was lost meanwhile, reconnect and take the held dead letters again."""
        try:
            self._wire.poll()
        except CONNECTION_ERRORS as exc:
            self._recover(self._wire.closing_reason() or exc, committing=False)

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
        committer = self._committer
        while self._pending or committer.to_repark:
            try:
                if committer.to_repark:
                    committer.repark()
                    continue
                committer.commit([item for item in self._held if item.action is not None])
            except CONNECTION_ERRORS as exc:
                if committer.note_missing_exchange(exc):
                    self._recover(exc, committing=False, counted=False)
                    continue
                self._recover(exc, committing=committer.committing)

    def _done(self, items: list[Item]) -> None:
        """Forget ``items``, committed, and count them."""
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

    # -- recovering ------------------------------------------------------------

    def _recover(self, exc: BaseException, *, committing: bool, counted: bool = True) -> None:
        """Reconnect after ``exc`` and take the held dead letters again (or
        learn that their transaction was committed)."""
        self._committer.committing = False
        if counted:
            if not _recoverable(exc):
                raise self._wire.error(exc, "replaying") from exc
            self._recoveries += 1
            if self._recoveries > MAX_RECOVERIES:
                why = ""
                if isinstance(exc, pika.exceptions.ConsumerCancelled):
                    why = f" (the broker cancelled the consumer each time: {CANCELLED_WHY})"
                raise self._wire.error(
                    exc, f"giving up after {MAX_RECOVERIES} reconnections{why}"
                ) from exc
            if isinstance(exc, pika.exceptions.ConsumerCancelled):
                log.warning(
                    "The broker cancelled this run's consumer of %s although the queue "
                    "exists (%s); reconnecting to take the dead letters this run held again",
                    self.queue,
                    CANCELLED_WHY,
                )
            else:
                log.warning("Lost the connection to %s (%r); reconnecting", self.queue, exc)
        self._wire.close()
        self._wire.open()
        # Also when nothing is held: what the broker sent ahead must be back
        # at the head before this run takes anything more.
        self._wire.wait_for_release()
        held = self._held
        if not held:
            return
        try:
            first = self._wire.take()
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
                again = first if index == 0 else self._wire.take()
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
