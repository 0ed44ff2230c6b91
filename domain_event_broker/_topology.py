"""Declaring a handler's exchanges, queues and bindings on a channel.

Plain functions of a channel and a :class:`Registration`; the names come
from :mod:`._names`. Used by the Subscriber when registering, after every
reconnection, and for each retry's delay queue.
"""

from __future__ import annotations

import logging

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from . import _names
from ._registration import Registration
from .errors import ConfigurationError

__all__ = ["dead_letter_route", "declare_delay", "declare_handler"]

log = logging.getLogger(__name__)


def declare_handler(
    channel: BlockingChannel, registration: Registration, exchange: str, exchange_type: str
) -> None:
    """Declare one handler's whole topology (3.0.2's names and arguments).

    Raises:
        ConfigurationError: the inbox exists with other arguments.
        pika.exceptions.AMQPError: anything else the broker refused; the
            caller translates it.
    """
    name = registration.name
    arguments: dict[str, object] = {}
    if registration.dead_letter:
        dlx = _names.dead_letter_exchange(name)
        dlq = _names.dead_letter_queue(name)
        channel.exchange_declare(exchange=dlx, exchange_type=exchange_type)
        channel.queue_declare(queue=dlq, durable=True)
        for key in registration.binding_keys:
            channel.queue_bind(exchange=dlx, queue=dlq, routing_key=key)
        arguments["x-dead-letter-exchange"] = dlx
    try:
        channel.queue_declare(
            queue=name,
            durable=registration.durable,
            exclusive=registration.exclusive,
            auto_delete=registration.auto_delete,
            arguments=arguments,
        )
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise ConfigurationError(
                f"queue {name!r} already exists with other settings than "
                f"dead_letter={registration.dead_letter}, durable={registration.durable}, "
                f"exclusive={registration.exclusive}, auto_delete={registration.auto_delete} "
                f"({exc.reply_text}). Register it as it was declared, or drain and delete "
                f"the queue first."
            ) from exc
        raise
    channel.exchange_declare(
        exchange=exchange, exchange_type=exchange_type, durable=True, auto_delete=False
    )
    retry = _names.retry_exchange(name)
    channel.exchange_declare(exchange=retry, exchange_type=exchange_type)
    for key in registration.binding_keys:
        channel.queue_bind(exchange=exchange, queue=name, routing_key=key)
        channel.queue_bind(exchange=retry, queue=name, routing_key=key)


def declare_delay(
    channel: BlockingChannel, registration: Registration, milliseconds: int, exchange_type: str
) -> tuple[str, str]:
    """Declare (and so keep alive) the delay queue of a handler for one delay.

    Returns:
        The exchange and routing key to publish the retry with; the routing
        key ``None``-equivalent ``""`` means: keep the event's own key.
    """
    name = registration.name
    delay_name = _names.delay_queue(name, milliseconds)
    channel.queue_declare(
        queue=delay_name,
        durable=True,
        arguments=_names.delay_queue_arguments(name, milliseconds),
    )
    channel.exchange_declare(
        exchange=delay_name, durable=True, auto_delete=True, exchange_type=exchange_type
    )
    channel.queue_bind(exchange=delay_name, queue=delay_name, routing_key="#")
    return delay_name, ""


def dead_letter_route(registration: Registration) -> tuple[str, str]:
    """The exchange and routing key a dead letter of a handler is published with.

    The routing key ``""`` means: keep the event's own key.
    """
    return _names.dead_letter_exchange(registration.name), ""
