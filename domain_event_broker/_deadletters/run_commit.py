"""Carrying out a batch of decided dead letters in transactions.

:class:`Committer` turns the actions of a batch into copies and
acknowledgements on a :class:`.run_channel.RunChannel` and commits
them: RETRY probes first (the first copy of each routing key not seen routed
yet, committed on its own), then everything else with the acknowledgements
in one transaction; copies that come back unroutable afterwards have their
dead letters put back. Why it is done this way is told in
:mod:`.run`'s docs. Lost connections are not its business: the
errors go to the caller, which recovers and calls again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pika.exceptions
import pika.spec

from .._telemetry import otel as _instrument
from ..errors import BrokerError
from .letters import parked_properties
from .run_channel import RunChannel
from .run_items import DISCARD, RETRY, Counts, Item, replay_properties

__all__ = ["Committer"]

#: The run's logger: its lines read as one, whichever module writes them.
log = logging.getLogger("domain_event_broker._deadletters.run")


class Committer:
    """Commits the decided dead letters of a run, batch by batch.

    Args:
        channel: the run's channel.
        exchange: the handler's retry exchange (where RETRY copies go).
        counts: the run's counts; unroutable copies are noted in them.
        on_committed: called with the items of a batch once it is committed.
        before_commit: called before each batch's commit (e.g. to flush an
            export).
    """

    def __init__(
        self,
        channel: RunChannel,
        exchange: str,
        counts: Counts,
        on_committed: Callable[[list[Item]], None],
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.exchange = exchange
        self._channel = channel
        self._counts = counts
        self._on_committed = on_committed
        self._before_commit = before_commit
        #: Routing keys this run has seen routed by the retry exchange.
        self._routable: set[str] = set()
        self._exchange_checked = False
        #: pika's error when the retry exchange turned out to be missing.
        self.exchange_missing: BaseException | None = None
        #: Acknowledged dead letters whose copy came back: to put back.
        self.to_repark: list[Item] = []
        #: The batch's own commit is under way (its outcome is unknown if the
        #: connection is lost now).
        self.committing = False

    def note_missing_exchange(self, exc: BaseException) -> bool:
        """Whether ``exc`` says that the retry exchange is missing (and if
        so, remember it: later RETRY copies are unroutable)."""
        missing = (
            isinstance(exc, pika.exceptions.ChannelClosedByBroker)
            and exc.reply_code == pika.spec.NOT_FOUND
            and self.exchange in str(exc.reply_text)
        )
        if missing:
            self.exchange_missing = exc
        return missing

    def commit(self, items: list[Item]) -> None:
        """Carry out ``items`` (every decided item held): probes first, then
        all of them in one transaction."""
        retries = [item for item in items if item.action == RETRY and not item.unroutable]
        if retries:
            self._check_exchange()
            if self.exchange_missing is not None:
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
                self._publish_copy(item, probe=True)
            returned = {
                key for exchange, key in self._channel.commit_probes() if exchange == self.exchange
            }
            for item in probes:
                if item.routing_key in returned:
                    self._mark_unroutable(item, "no queue is bound for routing key")
                else:
                    item.copied = True
                    self._routable.add(item.routing_key)
        # 2. Everything else, and the acknowledgements, in one transaction.
        for item in items:
            if item.action == RETRY and not item.unroutable:
                if not item.copied:
                    self._publish_copy(item)
            elif item.action != DISCARD:
                self._park(item)
            self._channel.ack(item)
        if self._before_commit is not None:
            self._before_commit()
        self.committing = True
        returned_list = self._channel.commit()
        self.committing = False
        self._on_committed(items)
        if returned_list:
            self._after_late_returns(items, returned_list)

    def repark(self) -> None:
        """Put back (at the tail) the dead letters of :attr:`to_repark`."""
        for item in self.to_repark:
            self._park(item)
        self._channel.commit()
        self.to_repark = []

    def _check_exchange(self) -> None:
        """Find out once whether the retry exchange exists (a publish to a
        missing exchange would close the channel without saying why)."""
        if self._exchange_checked:
            return
        missing = self._channel.missing_exchange(self.exchange)
        if missing is not None:
            self.exchange_missing = missing
        self._exchange_checked = True

    def _publish_copy(self, item: Item, *, probe: bool = False) -> None:
        copy = replay_properties(item.logical)
        headers = dict(copy.headers or {})
        publish = self._channel.publish_probe if probe else self._channel.publish
        with _instrument.replay_span(copy.message_id, self.exchange, item.routing_key, headers):
            copy.headers = headers or None  # with the replay span's trace context
            publish(self.exchange, item.routing_key, item.body, copy)

    def _park(self, item: Item) -> None:
        self._channel.publish(
            "",
            self._channel.queue,
            item.body,
            parked_properties(item.logical, item.routing_key),
        )

    def _mark_unroutable(self, item: Item, reason: str) -> None:
        item.unroutable = True
        self._counts.unroutable_reasons.setdefault(reason, set()).add(item.routing_key)

    def _after_late_returns(self, items: list[Item], returned: list[tuple[str, str]]) -> None:
        """Copies returned although their routing key was routed earlier in
        this run (the handler's queue was unbound meanwhile): their dead
        letters were acknowledged with them, so put them back (at the tail)."""
        queue = self._channel.queue
        if any(exchange == "" for exchange, _ in returned):
            raise BrokerError(
                f"the dead-letter queue {queue!r} was deleted during the run, "
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
            self._counts.replayed -= 1
            self._counts.unroutable += 1
        # Kept in memory until committed, also across a reconnection (if the
        # connection goes during that commit, they may be put back twice).
        self.to_repark = lost
        self.repark()
        log.warning(
            "%d replayed cop(ies) to %s came back unroutable; their dead letters were put back "
            "at the tail of %s",
            len(lost),
            self.exchange,
            queue,
        )
