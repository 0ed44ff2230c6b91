"""A connection link: one connection and confirm channel, and how it recovers.

:class:`Link` opens a connection and a channel in confirm mode lazily, knows
when they are gone, and never hands a forked child its parent's socket.
:class:`Recovery` is the backoff and the "lost / recovered" log lines of a
loop that keeps a link alive. Both are used by every long-lived user of a
connection, so reconnecting behaves and reads the same everywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel

from .._telemetry import otel as _instrument
from ..errors import BrokerUnavailableError
from .config import BrokerConfig, current
from .connect import (
    CONNECTION_ERRORS,
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    backoff_delays,
    close_quietly,
    connect,
)
from .failures import translate_pika_error
from .pika_internals import abort_connection, closing_reason

__all__ = ["Link", "Recovery"]

log = logging.getLogger(__name__)

#: Connections a forked child found (its parent's): never used, never closed.
_abandoned: list[object] = []


class Link:
    """A lazily opened connection with one confirm-mode (or transactional) channel.

    Only the thread that owns the link may use it (pika's blocking adapter is
    not thread-safe), except :meth:`wake` (safe from any thread).

    Args:
        config: the resolved broker settings; when they came from the
            configured source, each new connection reads it again
            (:func:`.config.current`), and :attr:`config` follows.
        connection_name: shown in the management UI.
        should_stop: polled between connection attempts; true ends them.
        setup: called with each new channel before it is handed out (e.g. to
            declare an exchange); what it raises closes the new connection
            and is raised (pika's channel errors translated).
        confirm: put each new channel in confirm mode; ``False`` leaves the
            mode to ``setup`` (replay's channels are transactional, which
            RabbitMQ refuses on a confirm-mode channel).
        what: how errors opening the channel describe it.
    """

    def __init__(
        self,
        config: BrokerConfig,
        connection_name: str,
        *,
        should_stop: Callable[[], bool] | None = None,
        setup: Callable[[BlockingChannel], None] | None = None,
        confirm: bool = True,
        what: str = "opening a channel",
    ) -> None:
        self.config = config
        self._connection_name = connection_name
        self._should_stop = should_stop
        self._setup = setup
        self._confirm = confirm
        self._what = what
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._pid = os.getpid()
        #: Counts channels opened; a delivery tag is only valid on its own.
        self.generation = 0

    @property
    def connection(self) -> pika.BlockingConnection | None:
        """The open connection, or ``None``."""
        self._forget_after_fork()
        return self._connection

    @property
    def is_open(self) -> bool:
        """Whether the channel is open (as far as pika knows)."""
        self._forget_after_fork()
        return self._channel is not None and self._channel.is_open

    def channel(self, time_left: float | None = None) -> BlockingChannel:
        """The open channel, opening the connection and channel if needed.

        Args:
            time_left: seconds connecting may take (default: the config's
                timeout); zero or less fails at once when not open.

        Raises:
            AuthenticationError: credentials refused.
            BrokerUnavailableError: no node answered in time, or the channel
                could not be opened; chains pika's error.
            Exception: what ``setup`` raised.
        """
        self._forget_after_fork()
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self.drop()
        if time_left is not None and time_left <= 0:
            raise BrokerUnavailableError(f"no time left to connect to {self.config.display}")
        # A new connection uses what the configured source holds now (a
        # rotated password), not what it held when this link was made.
        self.config = current(self.config)
        connection = connect(
            self.config,
            f"{self._connection_name} (pid {os.getpid()})",
            timeout=time_left,
            should_stop=self._should_stop,
        )
        try:
            channel = connection.channel()
            if self._confirm:
                channel.confirm_delivery()
            if self._setup is not None:
                self._setup(channel)
        except CONNECTION_ERRORS as exc:
            close_quietly(connection)
            raise translate_pika_error(exc, self._what) from exc
        except BaseException:
            close_quietly(connection)
            raise
        self._connection, self._channel = connection, channel
        self.generation += 1
        return channel

    def closing_reason(self) -> BaseException | None:
        """Why pika closed the channel, if it did and said so (``None`` also
        when pika's fast paths are off: see :func:`.pika_internals.closing_reason`)."""
        return closing_reason(self._channel)

    def drop(self) -> None:
        """Close the connection, if any, ignoring errors (it may be dead)."""
        self._forget_after_fork()
        connection, self._connection, self._channel = self._connection, None, None
        close_quietly(connection)

    def abort(self, reason: str) -> None:
        """Drop a connection that does not answer, without the closing
        handshake (which would wait for that answer)."""
        self._forget_after_fork()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is None or not connection.is_open:
            return
        try:
            if abort_connection(connection, reason):
                connection.process_data_events(0)  # the I/O loop notices the loss
            else:
                # Without pika's fast paths there is no abort: the connection
                # is forgotten, and its socket closed when it is collected.
                log.debug("Forgot a connection that did not answer (%s)", reason)
        except Exception:  # the loss just caused, or anything from a dead connection
            log.debug("Dropped a connection that did not answer", exc_info=True)

    def wake(self) -> None:
        """Have the owner's ``process_data_events`` return soon (any thread)."""
        connection = self._connection
        if connection is None:
            return
        try:
            connection.add_callback_threadsafe(_noop)
        except Exception:  # closed: the owner polls anyway
            log.debug("Could not wake the connection's thread", exc_info=True)

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the owner's thread at its next poll (any thread).

        Returns:
            False when there is no open connection to schedule it on.
        """
        connection = self._connection
        if connection is None:
            return False
        try:
            connection.add_callback_threadsafe(callback)
        except Exception:  # closed or closing
            log.debug("Could not schedule a callback", exc_info=True)
            return False
        return True

    def _forget_after_fork(self) -> None:
        if self._pid != os.getpid():
            # A forked child never uses (or closes) its parent's socket: the
            # parent's connection is only kept from the garbage collector.
            if self._connection is not None:
                _abandoned.append(self._connection)
            self._connection = self._channel = None
            self._pid = os.getpid()


class Recovery:
    """Backoff and log lines for a loop that reconnects after losing a link.

    One WARNING when the link is lost, DEBUG lines for failed attempts, one
    INFO when it is back, with how long it was down. Lines are written to the
    caller's logger, so they carry the caller's module name.

    Args:
        logger: where the lines go.
        where: the broker, as shown to people (password hidden).
        resumed: what the INFO line says happens next (e.g. "consuming again").
        component: who reconnects, for the reconnects metric (default: the
            logger's last name part).
        side: another side than the broker (e.g. "the outbox's database
            'default'"): its lines say "<side> failed (...)" and "<side>
            answers again after ...", and no reconnect is counted.
    """

    def __init__(
        self,
        logger: logging.Logger,
        where: str,
        resumed: str = "",
        component: str = "",
        *,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        side: str = "",
    ) -> None:
        self._log = logger
        self._component = component or logger.name.rsplit(".", 1)[-1]
        self._where = where
        self._side = side
        self._resumed = f"; {resumed}" if resumed else ""
        self._limits = (initial_backoff, max_backoff)
        self._backoff = backoff_delays(*self._limits)
        self._lost_since: float | None = None

    @property
    def lost(self) -> bool:
        """Whether the link is down (lost and not recovered yet)."""
        return self._lost_since is not None

    @property
    def lost_for(self) -> float:
        """Seconds since the link was lost (0 when it is not)."""
        return 0.0 if self._lost_since is None else time.monotonic() - self._lost_since

    def on_lost(
        self, exc: BaseException, advice: str = "", *, expected: str | None = None
    ) -> float:
        """Note a loss or a failed attempt; return how long to pause (seconds).

        Args:
            exc: what went wrong.
            advice: appended to the WARNING line.
            expected: a loss that is no fault (e.g. an idle connection the
                broker closed) is logged at INFO with this text instead.
        """
        if self._lost_since is None:
            self._lost_since = time.monotonic()
            if expected is not None:
                self._log.info("%s (%s); reconnecting", expected, type(exc).__name__)
                return self._backoff.next()
            self._log.warning(
                "%s (%s: %s); %s%s",
                f"{self._side} failed" if self._side else "Lost the connection to the broker",
                type(exc).__name__,
                exc,
                "retrying" if self._side else "reconnecting",
                advice,
            )
        else:
            self._log.debug(
                "%s: %r", f"{self._side} failed again" if self._side else "Reconnecting failed", exc
            )
        return self._backoff.next()

    def on_connected(self) -> None:
        """Note a working link; log the recovery if it had been lost."""
        if self._lost_since is None:
            return
        self._log.info(
            "%s after %.1fs%s",
            f"{self._side} answers again" if self._side else f"Reconnected to {self._where}",
            time.monotonic() - self._lost_since,
            self._resumed,
        )
        self._lost_since = None
        self._backoff = backoff_delays(*self._limits)
        if not self._side:
            _instrument.record_reconnect(self._component)


def _noop() -> None:
    """Wakes a connection's thread."""
