"""Declaring a handler's exchanges, queues and bindings on a channel.

Plain functions of a channel and a :class:`Registration`; the names come
from :mod:`.._amqp.names`. Used by the Subscriber when registering, after
every reconnection, and for each retry's delay queue; the exchanges and
bindings also by the queue-type migration (:mod:`.._deadletters.migrate`).

All topology policy lives here: durability, queue types and arguments, and
how queues of 3.0.2 or of the other type are taken over.

Restart safety. 3.0.2 declares ``name-retry`` and ``name-dlx`` non-durable and
its delay queues with ``x-dead-letter-exchange: name-retry``; its workers
re-declare exactly that during a rolling upgrade, and neither an exchange's
durability nor a queue's arguments can change in place. So those objects stay
as they are (still declared, for 3.0.2's workers and its waiting retries), and
every path 4.1 sends an event along runs through durable objects of new
names that 3.0.2 never declares:

- a retry waits in ``name-delay-<ms>-<type>``, which dead-letters into the
  durable fanout exchange ``name-retry-durable``, bound to the handler's queue
  (a durable binding): it re-enters the queue after a broker restart with no
  worker running, whatever its routing key;
- a dead letter is published to the durable fanout exchange
  ``name-dlx-durable``, bound to ``name-dl``; a quorum handler's queue
  dead-letters (delivery limit) into it too, at least once.

The 3.0.2 exchanges additionally bind with ``#``, so that anything sent to
``name-retry`` (3.0.2's retries, replays) or to ``name-dlx`` (3.0.2's dead
letters, broker-side dead-lettering of a queue 3.0.2 declared) reaches its
queue whatever its routing key.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import config as _config
from .._amqp import names as _names
from .._amqp.failures import denied_feature
from .._amqp.probes import queue_exists
from ..errors import ConfigurationError
from .registration import Registration

__all__ = [
    "dead_letter_bindings",
    "dead_letter_route",
    "declare_dead_letter_exchanges",
    "declare_delay",
    "declare_handler",
    "declare_inbox_exchanges",
    "inbox_bindings",
    "queue_type",
    "requested_queue_type",
]

log = logging.getLogger(__name__)

#: The queue type each handler's queue turned out to have, per channel: it
#: decides the type of the handler's delay queues.
_queue_types: weakref.WeakKeyDictionary[BlockingChannel, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def requested_queue_type(registration: Registration) -> str | None:
    """The queue type a handler asks for: its own, else the configured default.

    Raises:
        ConfigurationError: the environment names an unknown queue type.
    """
    return registration.queue_type or _config.default_queue_type()


def declare_handler(
    channel: BlockingChannel, registration: Registration, exchange: str, exchange_type: str
) -> None:
    """Declare one handler's whole topology.

    The handler's queue and ``name-dl`` get the requested queue type; one that
    exists with the other type is taken over as it is, with a WARNING saying
    how to migrate it.

    Raises:
        ConfigurationError: the queue exists with arguments this library
            never declares.
        pika.exceptions.AMQPError: anything else the broker refused; the
            caller translates it.
    """
    name = registration.name
    wanted = requested_queue_type(registration)
    if registration.dead_letter:
        dlq = _names.dead_letter_queue(name)
        declare_dead_letter_exchanges(channel, name, exchange_type)
        _declare_queue(
            channel,
            dlq,
            wanted,
            {"durable": True},
            _dead_letter_candidates(wanted),
            name,
        )
        for source, key in dead_letter_bindings(name, registration.binding_keys):
            channel.queue_bind(exchange=source, queue=dlq, routing_key=key)
    queue_type = _declare_queue(
        channel,
        name,
        wanted,
        {
            "durable": registration.durable,
            "exclusive": registration.exclusive,
            "auto_delete": registration.auto_delete,
        },
        [
            (t, _names.inbox_arguments(name, registration.dead_letter, t))
            for t in _candidates(wanted)
        ],
        name,
        registration,
    )
    _queue_types.setdefault(channel, {})[name] = queue_type
    declare_inbox_exchanges(channel, name, exchange, exchange_type)
    for source, key in inbox_bindings(name, registration.binding_keys, exchange):
        channel.queue_bind(exchange=source, queue=name, routing_key=key)


def declare_inbox_exchanges(
    channel: BlockingChannel, name: str, exchange: str, exchange_type: str
) -> None:
    """Declare the exchanges handler ``name``'s queue is bound to: the events
    ``exchange``, 3.0.2's ``name-retry`` and the durable ``name-retry-durable``."""
    channel.exchange_declare(
        exchange=exchange, exchange_type=exchange_type, durable=True, auto_delete=False
    )
    channel.exchange_declare(exchange=_names.retry_exchange(name), exchange_type=exchange_type)
    channel.exchange_declare(
        exchange=_names.durable_retry_exchange(name), exchange_type="fanout", durable=True
    )


def inbox_bindings(name: str, binding_keys: Sequence[str], exchange: str) -> list[tuple[str, str]]:
    """(exchange, routing key) of each binding of handler ``name``'s queue."""
    retry = _names.retry_exchange(name)
    return [
        *((exchange, key) for key in binding_keys),
        *((retry, key) for key in (*binding_keys, "#")),
        (_names.durable_retry_exchange(name), ""),
    ]


def declare_dead_letter_exchanges(channel: BlockingChannel, name: str, exchange_type: str) -> None:
    """Declare the exchanges ``name-dl`` is bound to: 3.0.2's ``name-dlx`` and
    the durable ``name-dlx-durable``."""
    channel.exchange_declare(
        exchange=_names.dead_letter_exchange(name), exchange_type=exchange_type
    )
    channel.exchange_declare(
        exchange=_names.durable_dead_letter_exchange(name), exchange_type="fanout", durable=True
    )


def dead_letter_bindings(name: str, binding_keys: Sequence[str]) -> list[tuple[str, str]]:
    """(exchange, routing key) of each binding of handler ``name``'s ``name-dl``."""
    dlx = _names.dead_letter_exchange(name)
    return [
        *((dlx, key) for key in (*binding_keys, "#")),
        (_names.durable_dead_letter_exchange(name), ""),
    ]


def declare_delay(
    channel: BlockingChannel, registration: Registration, milliseconds: int, exchange_type: str
) -> tuple[str, str]:
    """Declare (and so keep alive) the delay queue of a handler for one delay.

    The delay queue has the type of the handler's queue and dead-letters into
    the durable ``name-retry-durable``; quorum ones at least once.
    ``exchange_type`` is kept for the signature: the delay exchange is a
    fanout, so a retry's routing key never matters.

    Returns:
        The exchange and routing key to publish the retry with; the routing
        key ``""`` means: keep the event's own key.
    """
    del exchange_type
    name = registration.name
    queue_type = _queue_types.get(channel, {}).get(name)
    if queue_type is None:
        durable_retry = _names.durable_retry_exchange(name)
        channel.exchange_declare(exchange=durable_retry, exchange_type="fanout", durable=True)
        queue_type = _probe_type(channel, name)
        _queue_types.setdefault(channel, {})[name] = queue_type
    delay_name = _names.typed_delay_queue(name, milliseconds, queue_type)
    channel.queue_declare(
        queue=delay_name,
        durable=True,
        arguments=_names.typed_delay_queue_arguments(name, milliseconds, queue_type),
    )
    channel.exchange_declare(
        exchange=delay_name, exchange_type="fanout", durable=True, auto_delete=True
    )
    channel.queue_bind(exchange=delay_name, queue=delay_name, routing_key="")
    return delay_name, ""


def queue_type(channel: BlockingChannel, name: str) -> str:
    """The type of handler ``name``'s queue: as declared on ``channel``, else
    asked of the broker (and remembered for the channel)."""
    known = _queue_types.get(channel, {}).get(name)
    if known is None:
        known = _probe_type(channel, name)
        _queue_types.setdefault(channel, {})[name] = known
    return known


def dead_letter_route(registration: Registration) -> tuple[str, str]:
    """The exchange and routing key a dead letter of a handler is published with.

    The durable fanout ``name-dlx-durable``: it reaches ``name-dl`` whatever
    its routing key, which it keeps (replay re-publishes with it).
    The routing key ``""`` means: keep the event's own key.
    """
    return _names.durable_dead_letter_exchange(registration.name), ""


# -- taking over queues of either type -------------------------------------------------


def _candidates(wanted: str | None) -> list[str | None]:
    """Argument sets to try, the wanted one first, then those of the other types."""
    order: list[str | None] = [wanted]
    for queue_type in (None, "classic", "quorum"):
        if queue_type not in order:
            order.append(queue_type)
    return order


def _renewal_reason(queue: str, handler: str) -> str:
    """Why a queue taken over with earlier arguments should be migrated."""
    if queue == _names.dead_letter_queue(handler):
        return (
            "no x-delivery-limit: on RabbitMQ 4 a dead letter returned 20 times, e.g. "
            "inspected 20 times, is dropped"
        )
    return "an earlier version's arguments"


def _dead_letter_candidates(wanted: str | None) -> list[tuple[str | None, dict[str, object]]]:
    """Argument sets to try for ``name-dl``: this version's of each type, each
    followed by 4.1's where they differ."""
    candidates: list[tuple[str | None, dict[str, object]]] = []
    for queue_type in _candidates(wanted):
        candidates.append((queue_type, _names.dead_letter_queue_arguments(queue_type)))
        legacy = _names.legacy_dead_letter_queue_arguments(queue_type)
        if legacy is not None:
            candidates.append((queue_type, legacy))
    return candidates


def _declare_queue(
    channel: BlockingChannel,
    queue: str,
    wanted: str | None,
    options: dict[str, bool],
    candidates: Sequence[tuple[str | None, dict[str, object]]],
    handler: str,
    registration: Registration | None = None,
) -> str:
    """Declare ``queue`` with the first argument set the broker accepts.

    Each attempt runs on a channel of its own, as a refusal closes it.

    Returns:
        The queue's type.
    """
    first_error: pika.exceptions.ChannelClosedByBroker | None = None
    for index, (queue_type, arguments) in enumerate(candidates):
        probe = channel.connection.channel()
        try:
            probe.queue_declare(queue=queue, arguments=arguments, **options)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != pika.spec.PRECONDITION_FAILED:
                raise
            first_error = first_error or exc
            continue
        except pika.exceptions.ConnectionClosedByBroker as exc:
            if denied_feature(exc) == "transient_nonexcl_queues":
                raise ConfigurationError(
                    f"the broker refuses the queue {queue!r}: it does not permit "
                    f"non-durable queues that are not exclusive (durable=False, "
                    f"exclusive=False), as RabbitMQ 4.3 and later do by default (deprecated "
                    f"feature transient_nonexcl_queues). Register it with durable=True, or "
                    f"with exclusive=True for a queue private to this worker's connection"
                ) from exc
            raise
        else:
            probe.close()
        actual = queue_type or _probe_type(channel, queue, arguments, options)
        if index > 0 and wanted is not None:
            migrate = f"`domain-event-broker migrate {handler} --queue-type {wanted}`"
            if actual != wanted:
                log.warning(
                    "Queue %s exists as a %s queue, not as the %s queue asked for: "
                    "taken over as it is; run %s to move it",
                    queue,
                    actual,
                    wanted,
                    migrate,
                )
            else:
                log.warning(
                    "Queue %s exists as a %s queue with arguments this version no longer "
                    "declares (%s): taken over as it is; run %s to renew them",
                    queue,
                    actual,
                    _renewal_reason(queue, handler),
                    migrate,
                )
        return actual
    assert first_error is not None
    if registration is None:
        raise ConfigurationError(
            f"queue {queue!r} already exists with arguments this library never declares "
            f"({first_error.reply_text}). Drain and delete it first."
        ) from first_error
    raise ConfigurationError(
        f"queue {queue!r} already exists with other settings than "
        f"dead_letter={registration.dead_letter}, durable={registration.durable}, "
        f"exclusive={registration.exclusive}, auto_delete={registration.auto_delete} "
        f"({first_error.reply_text}). Register it as it was declared, or drain and delete "
        f"the queue first."
    ) from first_error


def _probe_type(
    channel: BlockingChannel,
    queue: str,
    arguments: dict[str, object] | None = None,
    options: dict[str, bool] | None = None,
) -> str:
    """The type of the existing ``queue``, declared with ``arguments`` and no type.

    Asks whether it is a classic queue first, which the broker confirms
    without closing a channel in the common case. Without ``arguments``
    (a handler's queue on a channel its topology was not declared on),
    tries each argument set 3.0.2 declares a handler's queue with, once it
    knows that the queue exists (a declaration would create it).
    """
    if arguments is None:
        if not queue_exists(channel.connection, queue):
            return "classic"
        for dead_letter in (True, False):
            candidate = {
                **_names.inbox_arguments(queue, dead_letter, None),
                "x-queue-type": "classic",
            }
            if _accepts(channel, queue, candidate, {"durable": True}):
                return "classic"
        return "quorum"
    if _accepts(channel, queue, {**arguments, "x-queue-type": "classic"}, options or {}):
        return "classic"
    return "quorum"


def _accepts(
    channel: BlockingChannel,
    queue: str,
    arguments: dict[str, object],
    options: dict[str, bool],
) -> bool:
    """Whether the broker accepts declaring the existing ``queue`` so (on a
    spare channel: a refusal closes it)."""
    probe = channel.connection.channel()
    try:
        probe.queue_declare(queue=queue, arguments=arguments, **options)
    except pika.exceptions.ChannelClosedByBroker as exc:
        # NOT_FOUND: a durable queue whose node is down.
        if exc.reply_code in (pika.spec.NOT_FOUND, pika.spec.PRECONDITION_FAILED):
            return False
        raise
    probe.close()
    return True
