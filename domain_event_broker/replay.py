"""Replaying dead-lettered domain events, and looking at them before.

A handler registered with ``dead_letter=True`` parks the events it failed on
in its dead-letter queue ``<name>-dl``. Once the cause is fixed, an operator
moves them back: :data:`RETRY` republishes an event to the handler's retry
exchange ``<name>-retry`` (so only that handler sees it again), :data:`DISCARD`
drops it, :data:`LEAVE` keeps it.

A run (:func:`replay_dead_letters`, :func:`replay_all`,
:func:`discard_dead_letters`, :func:`summarize_dead_letters`,
:func:`export_dead_letters`) visits the events that were in the dead-letter
queue when it started, oldest first, each exactly once, over one connection:

* it holds at most two batches (200) of dead letters unacknowledged, whatever
  the queue's length and however long a callback takes to answer;
* an event kept in place (:data:`LEAVE`, or passed over by a filter) is
  moved to the tail of the queue, with every property and header, in the
  same transaction that removes it from the head; events kept keep their
  order relative to each other; an event dead-lettered during the run lands
  among them (behind those moved before it arrived), and the run does not
  visit it;
* a replayed copy keeps every property and header of the dead letter (a
  persistent event stays persistent), dropping only RabbitMQ's ``x-death``
  bookkeeping and resetting the retry count, so the handler gets its
  retries again; the dead letter is removed only in the transaction that
  publishes its copy, or after its copy was routed;
* a copy that cannot be routed leaves its dead letter in place; the run
  goes on with the others and raises :class:`ReplayIncompleteError`, with
  the counts, at the end;
* a lost connection is reconnected; the run goes on where it was, losing
  nothing and doing nothing twice. One window remains: the first event of
  each routing key is replayed on its own (to learn whether its copy can be
  routed) before its dead letter is removed; if the connection goes during
  that commit, that copy may reach the handler twice.

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

from ._core.exports import claim
from ._deadletters.operations import (
    BATCH_SIZE,
    DISCARD,
    LEAVE,
    RETRY,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterSummary,
    HandlerStatus,
    MessageCallback,
    QueueStatus,
    ReplayIncompleteError,
    ReplayResult,
    discard_dead_letters,
    export_dead_letters,
    failure_reason,
    handler_status,
    import_dead_letters,
    inspect_dead_letters,
    parse_age,
    replay_all,
    replay_dead_letters,
    replay_event,
    retry_event,
    summarize_dead_letters,
    topic_matches,
)

__all__ = [
    "BATCH_SIZE",
    "DISCARD",
    "LEAVE",
    "RETRY",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterSummary",
    "HandlerStatus",
    "MessageCallback",
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

claim(__name__, globals(), __all__)
