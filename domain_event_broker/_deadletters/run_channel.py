"""The broker side of a run over a dead-letter queue: one connection with one
transactional channel that consumes the queue.

:class:`RunChannel` opens and closes that connection, takes the dead letters
the broker sends, publishes and acknowledges in the channel's transaction,
commits it (collecting the copies the broker returned as unroutable),
commits probe copies on a transactional channel of their own, and looks up
the queue and the retry exchange on spare channels. It decides
nothing and does not recover: :class:`.run.Session` does both.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Final

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from .._amqp import names as _names
from .._amqp.config import BrokerConfig
from .._amqp.connect import CONNECTION_ERRORS
from .._amqp.failures import translate_pika_error
from .._amqp.link import Link
from .._amqp.probes import probe_exchange, probe_queue
from ..errors import BrokerError, DeadLetterQueueNotFoundError, DomainEventBrokerError
from .letters import logical_view
from .run_items import Item

__all__ = ["CANCELLED_WHY", "RunChannel"]

#: Why the broker likely cancelled a run's consumer while its queue exists.
CANCELLED_WHY: Final = (
    "on RabbitMQ 4.3 and later a quorum queue does so when dead letters stay "
    "unacknowledged longer than the broker's consumer_timeout, e.g. while a replay "
    "callback or a person decides; or the queue moved in a cluster"
)

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


class RunChannel:
    """A run's connection and its transactional channel on ``<name>-dl``.

    Args:
        name: the handler name.
        config: the broker settings.
        purpose: shown in the connection's name.
        prefetch: dead letters the broker may send ahead, unacknowledged.
    """

    def __init__(self, name: str, config: BrokerConfig, purpose: str, prefetch: int) -> None:
        self.name = name
        self.queue = _names.dead_letter_queue(name)
        self._config = config
        self._prefetch = prefetch
        #: The connection; its channel is transactional, set up by _set_up.
        self._link = Link(
            config,
            f"domain-event-broker {purpose}",
            setup=self._set_up,
            confirm=False,
            what=f"opening a channel (dead-letter queue {self.queue!r})",
        )
        #: This run's channel (kept when the broker closes it, so that its
        #: use raises until the run reopens).
        self._channel: BlockingChannel | None = None
        #: Delivered by the broker, not taken yet.
        self._deliveries: deque[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes]]
        self._deliveries = deque()
        self._consumer_tag: str | None = None
        #: Whether the broker cancelled the consumer (a quorum queue's
        #: consumer timeout from RabbitMQ 4.3 on; see :meth:`_raise_if_cancelled`).
        self._cancelled = False
        #: (exchange, routing key) of the copies returned during a commit.
        self._returned: list[tuple[str, str]] = []
        #: The probes' channel (see :meth:`publish_probe`), opened on first use.
        self._probe_channel: BlockingChannel | None = None

    @property
    def _connection(self) -> pika.BlockingConnection | None:
        return self._link.connection

    @property
    def channel(self) -> BlockingChannel:
        """The (transactional) channel."""
        assert self._channel is not None
        return self._channel

    # -- opening and closing -----------------------------------------------------

    def open(self) -> None:
        """Connect and open the channel; what the broker had sent on an
        earlier channel is forgotten (it is back in the queue).

        Raises:
            DomainEventBrokerError: connecting or opening the channel failed.
        """
        self._link.drop()
        self._probe_channel = None
        self._channel = self._link.channel()
        # Deliveries of the old channel are back in the queue.
        self._deliveries.clear()
        self._consumer_tag = None
        self._cancelled = False

    def close(self) -> None:
        """Close the connection; uncommitted work is undone by the broker."""
        self._link.drop()
        self._channel = None
        self._probe_channel = None

    def _set_up(self, channel: BlockingChannel) -> None:
        """Each new channel: transactional, prefetch bounded, returns noted."""
        channel.tx_select()
        channel.basic_qos(prefetch_count=self._prefetch)
        channel.add_on_return_callback(self._on_returned)
        channel.add_on_cancel_callback(self._on_cancelled)

    def error(self, exc: BaseException, doing: str) -> DomainEventBrokerError:
        """pika's ``exc``, met while ``doing`` something, as this library's error."""
        return translate_pika_error(exc, f"{doing} (dead-letter queue {self.queue!r})")

    def poll(self) -> None:
        """Service the connection (heartbeats) without waiting.

        Raises:
            pika.exceptions.ChannelClosed: the channel was closed meanwhile.
            Any of pika's connection errors: the connection was lost.
        """
        assert self._connection is not None and self._channel is not None
        self._connection.process_data_events(0)
        if self._channel.is_closed:
            raise pika.exceptions.ChannelClosed(0, "closed while waiting")
        self._raise_if_cancelled()

    def closing_reason(self) -> BaseException | None:
        """Why pika closed the channel, if it did and said so."""
        return self._link.closing_reason()

    # -- looking up ----------------------------------------------------------------

    def count(self) -> int:
        """Messages ready in the dead-letter queue now.

        Raises:
            DeadLetterQueueNotFoundError: the queue does not exist.
            BrokerError: talking to the broker failed.
        """
        assert self._connection is not None
        try:
            found = probe_queue(self._connection, self.queue)
        except CONNECTION_ERRORS as exc:
            raise self.error(exc, "looking up the queue") from exc
        if not found.exists:
            raise DeadLetterQueueNotFoundError(
                f"handler {self.name!r} has no dead-letter queue {self.queue!r} on "
                f"{self._config.display} (was it registered with dead_letter=True?)"
            ) from found.not_found
        return found.messages

    def missing_exchange(self, exchange: str) -> BaseException | None:
        """pika's error if ``exchange`` does not exist, else ``None`` (on a
        spare channel: a publish to a missing exchange would close the
        transactional one without saying why)."""
        assert self._connection is not None
        return probe_exchange(self._connection, exchange).not_found

    def wait_for_release(self) -> None:
        """Wait until the broker noticed that the old connection is gone and
        put its unacknowledged dead letters back: until the queue has no
        consumer (a broker that missed the loss notices it within two
        heartbeat intervals)."""
        timeout = 2 * (self._config.heartbeat or 60.0) + RELEASE_MARGIN
        deadline = time.monotonic() + timeout
        assert self._connection is not None
        while True:
            found = probe_queue(self._connection, self.queue)
            if found.not_found is not None:
                raise found.not_found
            consumers = found.consumers
            if consumers == 0:
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{self.queue!r} still has {consumers} consumer(s) {timeout:g} s after "
                    "the connection was lost; the dead letters this run held are still reserved "
                    "(is another replay running?); nothing taken was lost"
                )
            self._connection.sleep(RELEASE_POLL)

    # -- taking ----------------------------------------------------------------------

    def take(self) -> Item | None:
        """The next dead letter the broker sends, or ``None`` when the queue
        is empty; starts consuming on the first call.

        Raises:
            BrokerError: nothing came for :data:`STALL_TIMEOUT` seconds
                although the queue has ready messages.
            pika.exceptions.ConsumerCancelled: the broker cancelled the
                consumer, and the queue exists.
            Any of pika's connection errors: the connection was lost.
        """
        assert self._channel is not None and self._connection is not None
        if self._consumer_tag is None:
            # Started only now, after the count at the start was read.
            self._consumer_tag = self._channel.basic_consume(self.queue, self._on_delivery)
        self._raise_if_cancelled()  # what it sent ahead is back in the queue
        idle = 0.0
        while not self._deliveries:
            self._connection.process_data_events(time_limit=IDLE_WAIT)
            if self._deliveries:
                break
            self._raise_if_cancelled()
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

    def stop_consuming(self) -> None:
        """Tell the broker to send no more dead letters (if it was asked to)."""
        if self._consumer_tag is None:
            return
        assert self._channel is not None
        if not self._cancelled:  # else the broker did
            self._channel.basic_cancel(self._consumer_tag)
        self._consumer_tag = None

    def return_unacknowledged(self) -> int:
        """Stop consuming, put every dead letter not acknowledged back in its
        place, and count the queue (on the same channel, so after the
        requeue)."""
        assert self._channel is not None
        self._raise_if_cancelled()
        self.stop_consuming()
        # Delivery tag 0 with multiple: every unacknowledged message.
        self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
        self._channel.tx_commit()
        self._deliveries.clear()
        frame = self._channel.queue_declare(self.queue, passive=True)
        return int(frame.method.message_count)

    def _on_delivery(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._deliveries.append((method, properties, body))

    # -- the transaction -------------------------------------------------------------

    def publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        """Publish ``body`` (mandatory) in the open transaction."""
        assert self._channel is not None
        self._channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=True,
        )

    def ack(self, item: Item) -> None:
        """Acknowledge ``item`` in the open transaction."""
        assert self._channel is not None
        self._channel.basic_ack(item.frame.delivery_tag)

    def commit(self) -> list[tuple[str, str]]:
        """Commit the transaction.

        Returns:
            (exchange, routing key) of every copy the broker returned as
            unroutable.

        Raises:
            pika.exceptions.ConsumerCancelled: the broker cancelled the
                consumer before the commit (nothing committed).
        """
        assert self._channel is not None and self._connection is not None
        self._returned = []
        # A quorum queue that timed the consumer out (RabbitMQ 4.3) put the
        # dead letters it held back and ignores their acknowledgements: a
        # commit now would publish the copies and leave the dead letters in
        # place. Read what the broker sent meanwhile, and do not commit then.
        self._connection.process_data_events(0)
        self._raise_if_cancelled()
        self._channel.tx_commit()
        # Dispatch the basic.return frames that came before commit-ok.
        self._connection.process_data_events(0)
        returned, self._returned = self._returned, []
        return returned

    def publish_probe(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        """Publish a probe copy (mandatory) in the probes' transaction.

        Probes go on a transactional channel of their own, which holds no
        dead letter: the broker's consumer timeout (which closes the
        consuming channel before RabbitMQ 4.3) cannot close it while the
        probe's commit is under way, after the copy was routed and before
        ``tx.commit-ok``, which would leave the copy's fate unknown and have
        it published again after the recovery.
        """
        channel = self._probe_channel
        if channel is None or not channel.is_open:
            assert self._connection is not None
            channel = self._connection.channel()
            channel.tx_select()
            channel.add_on_return_callback(self._on_returned)
            self._probe_channel = channel
        channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=True,
        )

    def commit_probes(self) -> list[tuple[str, str]]:
        """Commit the probes' transaction (see :meth:`publish_probe`).

        Returns:
            (exchange, routing key) of every copy the broker returned as
            unroutable.
        """
        assert self._probe_channel is not None and self._connection is not None
        self._returned = []
        self._probe_channel.tx_commit()
        # Dispatch the basic.return frames that came before commit-ok.
        self._connection.process_data_events(0)
        returned, self._returned = self._returned, []
        return returned

    def _on_cancelled(self, method_frame: pika.frame.Method) -> None:
        if method_frame.method.consumer_tag == self._consumer_tag:
            self._cancelled = True

    def _raise_if_cancelled(self) -> None:
        """Raise if the broker cancelled the consumer while the queue exists.

        A deleted queue raises its own error (the look-up finds it missing).
        Otherwise the run recovers on a new connection: RabbitMQ 4.3.6 keeps
        a timed-out consumer on its channel, and the dead letters it held are
        only certainly back in the queue once that channel is gone.
        """
        if not self._cancelled:
            return
        assert self._connection is not None
        if not probe_queue(self._connection, self.queue).exists:
            self.count()  # raises DeadLetterQueueNotFoundError
        raise pika.exceptions.ConsumerCancelled(
            f"the broker cancelled the consumer of {self.queue!r}"
        )

    def _on_returned(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Return,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._returned.append((method.exchange, method.routing_key))
