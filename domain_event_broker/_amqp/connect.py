"""Opening connections: bounded, jittered retries over a cluster's nodes.

This is the one place where pika's connection errors are translated.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Final

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from ..errors import AuthenticationError, BrokerUnavailableError, TLSError
from . import tls as _tls
from .config import BrokerConfig
from .failures import describe_error, is_auth_error
from .pika_internals import lean_io, lenient_decoding

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
    """Exponential backoff, capped at ``maximum``, with equal jitter by default.

    Each pause is drawn uniformly between half and all of the current step
    (without ``jitter``: it is the step); the step doubles after every pause,
    and :meth:`reset` starts again from ``initial``.
    """

    def __init__(self, initial: float, maximum: float, *, jitter: bool = True) -> None:
        self._initial = initial
        self._next = initial
        self._maximum = maximum
        self._jitter = jitter

    def next(self) -> float:
        step = self._next
        self._next = min(step * 2, self._maximum)
        return random.uniform(step / 2, step) if self._jitter else step

    def reset(self) -> None:
        """Start again from the first, shortest pause."""
        self._next = self._initial


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
    return _connect(config, connection_name, timeout, should_stop)[0]


def _connect(
    config: BrokerConfig,
    connection_name: str,
    timeout: float | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[pika.BlockingConnection, pika.ConnectionParameters]:
    """:func:`connect`, and the parameters of the node that answered."""
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
                return lenient_decoding(lean_io(pika.BlockingConnection(params))), params
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
