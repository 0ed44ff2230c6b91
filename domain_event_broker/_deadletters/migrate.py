"""Moving a handler's queues to the other queue type, losing nothing.

A queue's type cannot change in place. For the handler's queue ``name`` and
its dead-letter queue ``name-dl``, each in turn:

1. declare a holding queue ``<queue>-migrating`` of the new type and bind it
   as the queue is bound, so that new events reach it;
2. unbind the old queue: from now on new events go only to the holding queue;
3. move the old queue's messages into the holding queue, each confirmed
   before it is acknowledged, through a fanout exchange bound only to it
   (so each keeps its routing key, properties and headers);
4. delete the old queue (only when empty), declare it again with the new
   type and its arguments, bind it;
5. unbind the holding queue, move its messages back the same way, delete it.

Between a binding and an unbinding, an event published at that moment can
reach both queues: it is then delivered twice (at least once), never lost.
The handler's workers must be stopped meanwhile (the command refuses to run
while the queue has consumers); publishers keep publishing. Delay queues
are left alone: they dead-letter into ``name-retry-durable`` (or, 3.0.2's,
into ``name-retry``), which reach the new queue, and expire by themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import config as _config
from .._amqp import names as _names
from .._amqp.connect import CONNECTION_ERRORS, close_quietly, connect
from .._amqp.failures import translate_pika_error
from .._amqp.probes import probe_queue, queue_exists
from .._subscribing import topology as _topology
from ..errors import ConfigurationError, DomainEventBrokerError

__all__ = ["MigrationError", "migrate_queue_type"]

log = logging.getLogger(__name__)

#: Suffix of the holding queue used while a queue is moved.
HOLDING_SUFFIX = "-migrating"
#: Messages a drain may move beyond twice what its queue held at the start
#: (publishers may still add to the old queue's last batch) before it stops
#: as a queue that refills itself.
DRAIN_SLACK = 1000


class MigrationError(DomainEventBrokerError):
    """A queue cannot be migrated as asked (nothing was changed)."""


Report = Callable[[str], None]


def migrate_queue_type(
    name: str,
    queue_type: str,
    binding_keys: Sequence[str],
    connection_settings: _config.ConnectionSettings = _config.UNSET,
    *,
    exchange: str = _names.DEFAULT_EXCHANGE,
    exchange_type: str = _names.DEFAULT_EXCHANGE_TYPE,
    report: Report = log.info,
) -> int:
    """Move handler ``name``'s queue and dead-letter queue to ``queue_type``.

    Args:
        name: the handler (queue) name.
        queue_type: ``"classic"`` or ``"quorum"``.
        binding_keys: the handler's binding keys (as given to ``register``).
        connection_settings: AMQP URL(s); left out: the configured default.
        exchange: the events exchange the handler's queue is bound to.
        exchange_type: its type.
        report: called with one line per step done.

    Returns:
        The number of messages moved (each twice: out and back).

    Raises:
        ValueError: an unknown queue type or no binding key.
        MigrationError: the queue does not exist or has consumers.
        BrokerError: talking to the broker failed.
    """
    if queue_type not in _names.QUEUE_TYPES:
        raise ValueError(f"queue_type must be 'classic' or 'quorum', not {queue_type!r}")
    keys = tuple(binding_keys)
    if not keys or not all(isinstance(key, str) and key for key in keys):
        raise ValueError("give the handler's binding keys (at least one, none empty)")
    config = _config.resolve(connection_settings)
    if config is None:
        raise ConfigurationError("no broker configured")
    connection = None
    try:
        connection = connect(config, f"domain-event-broker migrate {name}")
        channel = connection.channel()
        channel.confirm_delivery()
        return _Migration(channel, name, queue_type, keys, exchange, exchange_type, report).run()
    except CONNECTION_ERRORS as exc:
        raise translate_pika_error(exc, f"migrating the queues of {name!r}") from exc
    finally:
        close_quietly(connection)


class _Migration:
    def __init__(
        self,
        channel: BlockingChannel,
        name: str,
        queue_type: str,
        keys: tuple[str, ...],
        exchange: str,
        exchange_type: str,
        report: Report,
    ) -> None:
        self.channel = channel
        self.name = name
        self.queue_type = queue_type
        self.keys = keys
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.report = report
        self.moved = 0

    def _exists(self, queue: str) -> bool:
        return queue_exists(self.channel.connection, queue)

    def run(self) -> int:
        name = self.name
        inbox = probe_queue(self.channel.connection, name)
        if not inbox.exists and not self._exists(name + HOLDING_SUFFIX):
            raise MigrationError(f"queue {name!r} does not exist: nothing to migrate")
        if inbox.consumers:
            raise MigrationError(
                f"queue {name!r} has {inbox.consumers} consumer(s): stop the handler's workers "
                "first (publishers may keep publishing)"
            )
        dlq = _names.dead_letter_queue(name)
        dead_letter = self._exists(dlq) or self._exists(dlq + HOLDING_SUFFIX)
        _topology.declare_inbox_exchanges(self.channel, name, self.exchange, self.exchange_type)
        if dead_letter:
            _topology.declare_dead_letter_exchanges(self.channel, name, self.exchange_type)
            # The dead letters first: the new handler's queue dead-letters into them.
            self._move_queue(
                dlq,
                _names.dead_letter_queue_arguments(self.queue_type),
                _topology.dead_letter_bindings(name, self.keys),
                _names.durable_dead_letter_exchange(name),
            )
        self._move_queue(
            name,
            _names.inbox_arguments(name, dead_letter, self.queue_type),
            _topology.inbox_bindings(name, self.keys, self.exchange),
            _names.durable_retry_exchange(name),
        )
        self.report(
            f"done: {name} is a {self.queue_type} queue"
            + (f", and so is {_names.dead_letter_queue(name)}" if dead_letter else "")
            + f"; register it with queue_type={self.queue_type!r} and start its workers"
        )
        return self.moved

    def _move_queue(
        self,
        queue: str,
        arguments: dict[str, object],
        bindings: list[tuple[str, str]],
        fanout: str,
    ) -> None:
        """Steps 1 to 5 for one queue; ``fanout`` is bound to it (and to nothing else
        of this handler's queues)."""
        ch = self.channel
        holding = queue + HOLDING_SUFFIX
        holding_exists = self._exists(holding)
        ch.queue_declare(queue=holding, durable=True, arguments={"x-queue-type": self.queue_type})
        for exchange, key in bindings:
            ch.queue_bind(queue=holding, exchange=exchange, routing_key=key)
        self.report(f"declared {holding} ({self.queue_type}) and bound it as {queue}")
        if self._exists(queue):
            for exchange, key in bindings:
                ch.queue_unbind(queue=queue, exchange=exchange, routing_key=key)
            # pika binds with the queue's name when given no key: an earlier 4.1 build did.
            ch.queue_unbind(queue=queue, exchange=fanout, routing_key=queue)
            self.report(f"unbound {queue}: new events go to {holding}")
            count = self._drain(queue, fanout)
            self.report(f"moved {count} message(s) from {queue} to {holding}")
            self._delete_empty(queue, fanout)
        elif holding_exists:
            self.report(f"{queue} is gone: resuming an interrupted migration from {holding}")
        # A channel that used the old queue keeps state of its type (RabbitMQ
        # 3.10 crashes the connection delivering to the new one through it).
        ch = self._renew_channel()
        ch.queue_declare(queue=queue, durable=True, arguments=arguments)
        for exchange, key in bindings:
            ch.queue_bind(queue=queue, exchange=exchange, routing_key=key)
        self.report(f"declared {queue} again as a {self.queue_type} queue and bound it")
        for exchange, key in bindings:
            ch.queue_unbind(queue=holding, exchange=exchange, routing_key=key)
        count = self._drain(holding, fanout)
        self.report(f"moved {count} message(s) from {holding} back to {queue}")
        self._delete_empty(holding, fanout)
        self.report(f"deleted {holding}")

    def _renew_channel(self) -> BlockingChannel:
        old = self.channel
        self.channel = old.connection.channel()
        self.channel.confirm_delivery()
        old.close()
        return self.channel

    def _delete_empty(self, queue: str, fanout: str) -> None:
        """Delete ``queue`` (unbound) once it is empty; quorum queues refuse
        ``if_empty``, so count, move what is left, and count again."""
        while True:
            frame = self.channel.queue_declare(queue=queue, passive=True)
            if frame.method.message_count == 0:
                break
            self._drain(queue, fanout)
        self.channel.queue_delete(queue=queue)

    def _drain(self, source: str, fanout: str) -> int:
        """Move every message of ``source`` through ``fanout``: confirm, then ack.

        Raises:
            MigrationError: ``source`` refills as fast as it is drained (it is
                still bound where the messages go); nothing is lost, the
                messages stay in the queues.
        """
        ch = self.channel
        held = ch.queue_declare(queue=source, passive=True).method.message_count
        count = 0
        while True:
            if count > 2 * held + DRAIN_SLACK:
                raise MigrationError(
                    f"{source} keeps refilling while it is moved ({count} message(s) moved, "
                    f"{held} at the start): it is still bound to {fanout!r}; unbind it and "
                    f"run the migration again"
                )
            method, properties, body = ch.basic_get(queue=source, auto_ack=False)
            if method is None:
                return count
            ch.basic_publish(
                exchange=fanout,
                routing_key=method.routing_key,
                body=body,
                properties=properties,
                mandatory=True,
            )
            ch.basic_ack(delivery_tag=method.delivery_tag)
            count += 1
            self.moved += 1
