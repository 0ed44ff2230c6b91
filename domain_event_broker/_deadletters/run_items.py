"""What a run over a dead-letter queue works with: the actions, one dead
letter taken (:class:`Item`), what was carried out (:class:`Counts`).

Shared by the run (:mod:`.run`), its channel (:mod:`.run_channel`), its
commits (:mod:`.run_commit`) and the operations built on it
(:mod:`.operations`, which re-exports the actions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import pika
import pika.spec

from .._core import headers as _headers

__all__ = [
    "DISCARD",
    "LEAVE",
    "RETRY",
    "SKIP",
    "Counts",
    "Item",
    "replay_properties",
]

#: Callback answer: republish the event to the handler's retry exchange.
RETRY: Final = "retry"
#: Callback answer: keep the event in the dead-letter queue.
LEAVE: Final = "leave"
#: Callback answer: remove the event for good.
DISCARD: Final = "discard"
#: Passed over by a filter: kept in place like LEAVE, counted apart.
SKIP: Final = "skip"


@dataclass
class Item:
    """One dead letter taken by a run, and what to do with it."""

    frame: pika.spec.Basic.Deliver
    properties: pika.BasicProperties
    body: bytes
    #: Its own routing key and properties (without this library's headers).
    routing_key: str
    logical: pika.BasicProperties
    action: str | None = None
    #: Its RETRY copy is known to be routed (a committed probe).
    copied: bool = False
    #: Its RETRY copy could not be routed: it is left in place instead.
    unroutable: bool = False


@dataclass
class Counts:
    """What a run carried out so far (committed only)."""

    replayed: int = 0
    discarded: int = 0
    left: int = 0
    skipped: int = 0
    unroutable: int = 0
    #: Why RETRY copies could not be routed: reason -> routing keys.
    unroutable_reasons: dict[str, set[str]] = field(default_factory=dict)


def replay_properties(properties: pika.BasicProperties | None) -> pika.BasicProperties:
    """A dead letter's (logical) properties for its republished copy: all
    kept, except RabbitMQ's death headers (dropped) and the retry count
    (reset)."""
    headers = _headers.without_death_headers(properties.headers if properties else None)
    headers.pop(_headers.RETRY_COUNT, None)
    return _headers.copy_properties(properties, headers)
