"""Every exchange and queue name derived from a handler name, in one place.

These names are the wire contract with domain-event-broker 3.0.2: workers of
both versions share them during a rolling upgrade. Do not change them.
"""

from __future__ import annotations

#: The topic exchange every domain event is published to.
DEFAULT_EXCHANGE = "domain-events"
DEFAULT_EXCHANGE_TYPE = "topic"

#: Extra time a delay queue lives after its last message expired (ms).
DELAY_QUEUE_EXPIRY_MARGIN_MS = 10_000


def retry_exchange(name: str) -> str:
    """Topic exchange where delayed retries and replays re-enter ``name``."""
    return f"{name}-retry"


def dead_letter_exchange(name: str) -> str:
    """Topic exchange routing ``name``'s dead letters to its ``-dl`` queue."""
    return f"{name}-dlx"


def dead_letter_queue(name: str) -> str:
    """Durable queue holding ``name``'s dead letters until replayed."""
    return f"{name}-dl"


def delay_ms(delay: float) -> int:
    """A retry delay in seconds, as the whole milliseconds used in names."""
    return int(delay * 1000)


def delay_queue(name: str, milliseconds: int) -> str:
    """Queue (and exchange of the same name) holding retries of ``name``
    for ``milliseconds`` before they dead-letter into the retry exchange."""
    return f"{name}-delay-{milliseconds}"


def delay_queue_arguments(name: str, milliseconds: int) -> dict[str, object]:
    """The arguments 3.0.2 declares a delay queue with."""
    return {
        "x-dead-letter-exchange": retry_exchange(name),
        "x-message-ttl": milliseconds,
        "x-expires": milliseconds + DELAY_QUEUE_EXPIRY_MARGIN_MS,
    }


def delay_queue_prefix(name: str) -> str:
    """Prefix shared by all delay queues of ``name`` (for status listings)."""
    return f"{name}-delay-"
