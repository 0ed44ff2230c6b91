"""Where pika 1.x's own I/O is replaced, for speed: the one module that
touches pika's private names on the hot path.

Each replacement checks for the names it uses and leaves pika as it is
when they are missing (another pika), and keeps the bytes on the wire the
same. ``tests/test_socket_io.py`` and ``tests/test_consume_path.py`` run
pika's own classes, so a pika release that changes them fails there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any, Final

import pika
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils import io_services_utils

__all__ = ["deliver_as_read", "lean_io"]

log = logging.getLogger(__name__)


def lean_io(connection: pika.BlockingConnection) -> pika.BlockingConnection:
    """Spare ``connection`` the system calls pika makes for nothing.

    * Each message's method, header and body frames reach the socket in one
      write, as the message is sent (:func:`_send_now`). pika writes them one
      by one, so a small message cost three ``send()`` calls and three TCP
      segments for the broker to read, each after a turn of its loop.
    * Reading stops once the socket is empty (:func:`_read_until_empty`):
      pika read again until the kernel said "would block", a system call
      and a Python exception per wakeup.

    The bytes on the wire are the same. ``_output_marshaled_frames`` is where
    pika 1.x emits a message's frames; on another pika, nothing changes.
    """
    impl = connection._impl
    if not hasattr(impl, "_output_marshaled_frames") or not hasattr(impl, "_adapter_emit_data"):
        return connection  # pragma: no cover - another pika than 1.x

    def output_marshaled_frames(marshaled_frames: Sequence[bytes]) -> None:
        data = marshaled_frames[0] if len(marshaled_frames) == 1 else b"".join(marshaled_frames)
        impl.bytes_sent += len(data)
        impl.frames_sent += len(marshaled_frames)
        rest = _send_now(impl._transport, data)
        if rest:
            impl._adapter_emit_data(rest)  # queued: sent when the socket can take it

    impl._output_marshaled_frames = output_marshaled_frames
    transport = getattr(impl, "_transport", None)
    if _is_plain(transport):
        transport._consume = functools.partial(_read_until_empty, transport)  # type: ignore[union-attr]
    return connection


#: pika's transport for plain TCP, and its state while the connection is up.
_PLAIN_TRANSPORT: Final = getattr(io_services_utils, "_AsyncPlaintextTransport", None)
_ACTIVE: Final = getattr(_PLAIN_TRANSPORT, "_STATE_ACTIVE", None)


def _is_plain(transport: object) -> bool:
    """Whether ``transport`` is pika's plain TCP one (TLS keeps pika's own I/O)."""
    return _PLAIN_TRANSPORT is not None and type(transport) is _PLAIN_TRANSPORT


def _send_now(transport: Any, data: bytes) -> bytes:
    """Hand ``data`` to the socket now if nothing is queued before it; return
    what the socket did not take.

    pika queues every write, asks its event loop to watch the socket for
    writability, and sends on the loop's next turn: two more system calls
    and a poll per message. A socket with free buffer space (the usual case)
    takes the message at once; what it does not take is returned, to be
    queued behind nothing, so the order of bytes holds. Only a plain TCP
    connection with an empty queue sends at once. A socket error is left to
    pika's own write, which meets it again and closes the connection as it
    always does.
    """
    if not _is_plain(transport) or transport._state != _ACTIVE or transport._tx_buffered_byte_count:
        return data
    try:
        sent: int = transport._sock.send(data)
    except OSError:  # would block, or broken: see the docstring
        return data
    return data[sent:]


def _read_until_empty(transport: Any) -> None:
    """pika's ``_consume`` for a plain TCP transport, without the last read.

    pika reads in chunks until ``recv()`` raises "would block" (or 100 kB
    were read). A chunk shorter than asked for means the socket was empty
    just then, so this stops there: the event loop watches the socket
    (level-triggered) and calls again as soon as more arrives. Everything
    else is pika's: end of stream, errors, the per-wakeup limit.

    Raises:
        RxEndOfFile: the broker closed the connection.
        OSError: from ``recv()``, as pika's own.
    """
    chunk, limit = transport._MAX_RECV_BYTES, transport._MAX_CONSUME_BYTES
    received = 0
    while transport._state == _ACTIVE and received < limit:
        data: bytes = transport._sock.recv(chunk)
        if not data:
            log.debug("The broker closed the connection (end of stream)")
            raise transport.RxEndOfFile()
        received += len(data)
        transport._protocol.data_received(data)
        if len(data) < chunk:
            return


def deliver_as_read(channel: BlockingChannel, consumer_tag: str) -> None:
    """Have pika call the consumer ``consumer_tag`` of ``channel`` as each
    delivery is read, rather than queue it for a later dispatch.

    pika's ``BlockingChannel`` wraps every delivery in an event object,
    queues it, and calls the consumer from ``process_data_events()`` once the
    read is done: about 2 µs per delivery, a sixth of decoding it. Here the
    consumer is called straight from the frame that completes the message,
    with the same arguments; ``process_data_events()`` is still asked to
    return after the read, as it would to dispatch. The consumer must only
    note the delivery (it runs inside pika's reading, where using the
    channel would nest).

    Cancelling still works as pika documents it, except that no delivery is
    left undispatched for ``basic_cancel()`` to reject: each one has reached
    the consumer already.

    On a pika without the names used, or for an unknown consumer, the
    consumer is left as pika made it.
    """
    impl_consumers = getattr(getattr(channel, "_impl", None), "_consumers", None)
    infos = getattr(channel, "_consumer_infos", None)
    request_dispatch = getattr(channel.connection, "_request_channel_dispatch", None)
    info = infos.get(consumer_tag) if isinstance(infos, dict) else None
    callback = getattr(info, "on_message_callback", None)
    if (
        not isinstance(impl_consumers, dict)
        or consumer_tag not in impl_consumers
        or callback is None
        or request_dispatch is None
    ):
        return  # pragma: no cover - another pika than 1.x
    wake_number = -channel.channel_number  # negative: "return", nothing to dispatch

    def deliver(
        _impl: object,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        callback(channel, method, properties, body)
        request_dispatch(wake_number)

    impl_consumers[consumer_tag] = deliver
