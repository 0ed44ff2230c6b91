"""Every exchange and queue name derived from a handler name, in one place.

The 3.0.2 names (``name``, ``name-retry``, ``name-dlx``, ``name-dl``,
``name-delay-<ms>``) and their arguments are the wire contract with
domain-event-broker 3.0.2: workers of both versions share them during a
rolling upgrade. Do not change them.

4.1 adds objects of new names, so that 3.0.2's (which it declares non-durable
or with a fixed set of arguments) never have to change: the durable fanout
exchanges ``name-retry-durable`` and ``name-dlx-durable``, and delay queues
``name-delay-<ms>-<type>`` that dead-letter into ``name-retry-durable``.
"""

from __future__ import annotations

#: The topic exchange every domain event is published to.
DEFAULT_EXCHANGE = "domain-events"
DEFAULT_EXCHANGE_TYPE = "topic"

#: Extra time a delay queue lives after its last message expired (ms).
DELAY_QUEUE_EXPIRY_MARGIN_MS = 10_000

#: The same for 4.1's delay queues: long enough for a quorum delay queue to
#: finish dead-lettering (at least once) while its handler's queue is
#: unavailable, e.g. during a leader election or a node's restart.
TYPED_DELAY_QUEUE_EXPIRY_MARGIN_MS = 3_600_000

#: The queue types a handler may ask for (``None``: the broker's default).
QUEUE_TYPES = ("classic", "quorum")

#: ``x-delivery-limit`` of quorum queues this library declares: RabbitMQ 4's
#: default, also on RabbitMQ 3.x (which has none). Past it the broker
#: dead-letters the event (reason ``delivery_limit``).
QUORUM_DELIVERY_LIMIT = 20

#: ``x-delivery-limit`` of quorum ``name-dl`` queues (4.2): high enough never
#: to be reached by looking (each ``inspect`` returns what it looked at, and
#: that counts), but not ``-1``, which RabbitMQ 3.x takes as "dead-letter at
#: the first return" (4.x as "no limit"). A ``name-dl`` declared by 4.1 has
#: none, so RabbitMQ 4's default of 20 applies to it until it is migrated.
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000_000


def retry_exchange(name: str) -> str:
    """Topic exchange where delayed retries and replays re-enter ``name``."""
    return f"{name}-retry"


def dead_letter_exchange(name: str) -> str:
    """Topic exchange routing ``name``'s dead letters to its ``-dl`` queue."""
    return f"{name}-dlx"


def durable_retry_exchange(name: str) -> str:
    """Durable fanout exchange through which 4.1's delayed retries re-enter ``name``.

    .. versionadded:: 4.1
    """
    return f"{name}-retry-durable"


def durable_dead_letter_exchange(name: str) -> str:
    """Durable fanout exchange routing every dead letter of ``name`` to ``name-dl``.

    .. versionadded:: 4.1
    """
    return f"{name}-dlx-durable"


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


def typed_delay_queue(name: str, milliseconds: int, queue_type: str) -> str:
    """4.1's delay queue (and fanout exchange of the same name) of ``name`` for
    ``milliseconds``, of ``queue_type``; it dead-letters into
    :func:`durable_retry_exchange`.

    .. versionadded:: 4.1
    """
    return f"{name}-delay-{milliseconds}-{queue_type}"


def typed_delay_queue_arguments(name: str, milliseconds: int, queue_type: str) -> dict[str, object]:
    """The arguments of :func:`typed_delay_queue`.

    A quorum delay queue dead-letters at least once (which needs
    ``reject-publish`` overflow): an expired retry stays in it until the
    handler's queue confirmed it, through leader changes and node losses.
    """
    arguments: dict[str, object] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": durable_retry_exchange(name),
        "x-message-ttl": milliseconds,
        "x-expires": milliseconds + TYPED_DELAY_QUEUE_EXPIRY_MARGIN_MS,
    }
    if queue_type == "quorum":
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def inbox_arguments(name: str, dead_letter: bool, queue_type: str | None) -> dict[str, object]:
    """The arguments of a handler's queue ``name``.

    No queue type: 3.0.2's arguments, so its queues are taken over and its
    workers can share them. ``"classic"``: the same, with the type. ``"quorum"``:
    a delivery limit, and dead-lettering at least once into the durable
    :func:`durable_dead_letter_exchange`.
    """
    if queue_type == "quorum":
        arguments: dict[str, object] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
        }
        if dead_letter:
            arguments["x-dead-letter-exchange"] = durable_dead_letter_exchange(name)
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        return arguments
    arguments = {} if queue_type is None else {"x-queue-type": queue_type}
    if dead_letter:
        arguments["x-dead-letter-exchange"] = dead_letter_exchange(name)
    return arguments


def dead_letter_queue_arguments(queue_type: str | None) -> dict[str, object]:
    """The arguments of ``name-dl`` (3.0.2's: none).

    A quorum ``name-dl`` gets :data:`DEAD_LETTER_DELIVERY_LIMIT`: looking at a
    dead letter (``inspect``) or walking past it returns it to the queue,
    which counts as a delivery, and RabbitMQ 4 would otherwise drop it (there
    is no dead-letter exchange behind ``name-dl``) after 20.
    """
    if queue_type == "quorum":
        return {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}
    return {} if queue_type is None else {"x-queue-type": queue_type}


def legacy_dead_letter_queue_arguments(queue_type: str | None) -> dict[str, object] | None:
    """The arguments 4.1 declared ``name-dl`` of ``queue_type`` with, where they
    differ from :func:`dead_letter_queue_arguments` (else ``None``): such a
    queue is taken over as it is, and ``migrate`` renews it."""
    if queue_type == "quorum":
        return {"x-queue-type": "quorum"}
    return None


def delay_queues(name: str, milliseconds: int) -> tuple[str, ...]:
    """Every delay queue ``name`` may have for ``milliseconds``: 3.0.2's and 4.1's."""
    return (
        delay_queue(name, milliseconds),
        *(typed_delay_queue(name, milliseconds, queue_type) for queue_type in QUEUE_TYPES),
    )


def delay_queue_prefix(name: str) -> str:
    """Prefix shared by all delay queues of ``name`` (for status listings)."""
    return f"{name}-delay-"
