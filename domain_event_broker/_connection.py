"""Opening connections: bounded, jittered retries over a cluster's nodes.

This is the one place where pika's connection errors are translated.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import pika
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils import io_services_utils
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from . import _tls
from ._config import BrokerConfig
from .errors import (
    AuthenticationError,
    BrokerUnavailableError,
    TLSError,
    describe_error,
    is_auth_error,
)

log = logging.getLogger(__name__)

#: First pause between two rounds of connection attempts (seconds).
INITIAL_BACKOFF: Final = 0.1
#: Longest pause between two rounds of connection attempts (seconds).
MAX_BACKOFF: Final = 5.0

#: What pika raises when a connection or channel cannot be used (any more).
CONNECTION_ERRORS: Final = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    # e.g. AMQPConnectorStackTimeout: a node that accepts TCP but never speaks AMQP.
    AMQPConnectorException,
    ConnectionError,
    OSError,
)


def backoff_delays(initial: float = INITIAL_BACKOFF, maximum: float = MAX_BACKOFF) -> Backoff:
    """A fresh jittered exponential backoff."""
    return Backoff(initial, maximum)


class Backoff:
    """Exponential backoff with equal jitter, capped at ``maximum``.

    Each pause is drawn uniformly between half and all of the current step;
    the step doubles after every pause.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self._next = initial
        self._maximum = maximum

    def next(self) -> float:
        delay = random.uniform(self._next / 2, self._next)
        self._next = min(self._next * 2, self._maximum)
        return delay


def connect(
    config: BrokerConfig,
    connection_name: str,
    *,
    timeout: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> pika.BlockingConnection:
    """Open a blocking connection to the first node of ``config`` that answers.

    Rounds over all URLs are repeated with jittered exponential backoff until
    ``timeout`` (default: ``config.timeout``) has passed.

    Args:
        config: the resolved broker settings.
        connection_name: shown in the management UI and ``rabbitmqctl``.
        timeout: overall deadline in seconds.
        should_stop: polled between attempts; when it returns true, give up.

    Raises:
        AuthenticationError: credentials or vhost refused (not retried).
        TLSError: TLS failed on a node and no other node answered in this
            round (not retried).
        BrokerUnavailableError: no node answered in time; chains pika's error.
    """
    started = time.monotonic()
    deadline = started + (config.timeout if timeout is None else timeout)
    backoff = backoff_delays()
    last_error: BaseException | None = None
    #: The last reason each node gave, by "host:port", in the order tried.
    reasons: dict[str, str] = {}
    attempts = 0
    while True:
        tls_failure: tuple[str, BaseException] | None = None
        for index in range(len(config.urls)):
            # Each attempt gets a share of what is left of the deadline, so a
            # silent node neither stretches the round past it nor starves
            # the nodes after it.
            time_left = deadline - time.monotonic()
            if time_left <= 0:
                break
            share = time_left / (len(config.urls) - index)
            params = config.parameters(connection_name, share)[index]
            attempts += 1
            try:
                return _lean_io(pika.BlockingConnection(params))
            except CONNECTION_ERRORS as exc:
                if is_auth_error(exc) or _auth_in_chain(exc):
                    raise AuthenticationError(
                        f"the broker at {config.display} refused the credentials or "
                        f"virtual host: {describe_error(exc)}"
                    ) from exc
                last_error = exc
                reasons[f"{params.host}:{params.port}"] = describe_error(exc)
                log.debug("Connecting to %s failed: %r", params.host, exc)
                tls_failure = tls_failure or _tls_failure(exc, params)
        if tls_failure is not None:
            raise TLSError(
                f"could not connect securely to the broker at {config.display}: {tls_failure[0]}"
            ) from tls_failure[1]
        pause = backoff.next()
        if time.monotonic() + pause >= deadline or (should_stop is not None and should_stop()):
            raise BrokerUnavailableError(
                f"could not connect to the broker at {config.display}: "
                f"{_summary(reasons, last_error)} ({attempts} attempt(s) in "
                f"{time.monotonic() - started:.1f}s)"
            ) from last_error
        time.sleep(pause)


def _lean_io(connection: pika.BlockingConnection) -> pika.BlockingConnection:
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


def deliver_as_read(channel: BlockingChannel, consumer_tag: str) -> bool:
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

    Returns:
        False when this pika has not the names used, or the consumer is
        unknown: it is then left as pika made it.
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
        return False  # pragma: no cover - another pika than 1.x
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
    return True


def _tls_failure(
    exc: BaseException, params: pika.ConnectionParameters
) -> tuple[str, BaseException] | None:
    """(cause, error) when ``exc`` is a TLS failure that retrying cannot fix."""
    if params.ssl_options is None:
        return None
    cause = _tls.failure_cause(
        exc, params.host, params.port, params.ssl_options.server_hostname or params.host
    )
    return None if cause is None else (cause, exc)


def _auth_in_chain(exc: BaseException) -> bool:
    # pika wraps the real cause in AMQPConnectionError(args=(inner,)).
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, BaseException) and is_auth_error(arg):
            return True
    return False


def _summary(reasons: dict[str, str], last_error: BaseException | None) -> str:
    """One line: the last reason of each node tried."""
    if not reasons:
        return describe_error(last_error)
    if len(set(reasons.values())) == 1:
        (reason,) = set(reasons.values())
        return f"{reason} (nodes tried: {', '.join(reasons)})"
    return "; ".join(f"{node}: {reason}" for node, reason in reasons.items())


def close_quietly(connection: pika.BlockingConnection | None) -> None:
    """Close ``connection`` if it is open, ignoring errors (it may be dead)."""
    if connection is None:
        return
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # closing a broken connection may raise anything
        log.debug("Ignoring an error while closing a connection", exc_info=True)


def connection_info(config: BrokerConfig) -> _tls.ConnectionInfo:
    """Connect once and tell which node answered, over TLS or not (for ``status``).

    Raises:
        AuthenticationError, TLSError, BrokerUnavailableError: as :func:`connect`.
    """
    connection = connect(config, f"domain-event-broker status (pid {os.getpid()})")
    try:
        params = connection._impl.params
        return _tls.ConnectionInfo(params.host, params.port, _tls.session_info(connection))
    finally:
        close_quietly(connection)
