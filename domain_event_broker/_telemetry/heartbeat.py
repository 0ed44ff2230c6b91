"""A health-check heartbeat: a file touched while a worker is connected and not stalled.

:mod:`domain_event_broker.telemetry` documents and re-exports these.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_HEARTBEAT_INTERVAL", "DEFAULT_STALL_AFTER", "Heartbeat", "health_file_age"]

#: Seconds between two touches of a health file, by default.
DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
#: A handler busy on one event for longer than this (seconds) counts as
#: stalled: the heartbeat stops until it returns.
DEFAULT_STALL_AFTER: Final = 300.0


class Heartbeat:
    """Touches a file while a worker is connected and not stalled.

    A supervisor checks the file's age (``domain-event-broker health --file
    F --max-age S``): older than ``S`` means the worker is stuck, or has been
    disconnected, for at least that long.

    The subscriber calls :meth:`tick` from its consuming loop (at least once
    a second while the connection is open), passing how long its handler has
    been busy on the current event; a tick while that exceeds
    ``stall_after`` does nothing, so a hung handler makes the file go stale.

    Args:
        path: the file to touch (created when missing).
        interval: touch at most this often (seconds).
        stall_after: handler time (seconds) after which ticks are ignored.

    Raises:
        ValueError: ``interval`` or ``stall_after`` is not positive.

    .. versionadded:: 4.1
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        stall_after: float = DEFAULT_STALL_AFTER,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        if not stall_after > 0:
            raise ValueError(f"stall_after must be positive, not {stall_after!r}")
        self.path = Path(path)
        self.interval = interval
        self.stall_after = stall_after
        self._last = -float("inf")

    def __repr__(self) -> str:
        return f"<Heartbeat {str(self.path)!r} every {self.interval:g}s>"

    def tick(self, handler_busy_for: float = 0.0) -> None:
        """Touch the file if ``interval`` has passed and the handler is not stalled.

        Args:
            handler_busy_for: seconds the handler has been running on the
                current event (0 when idle).
        """
        if handler_busy_for >= self.stall_after:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.touch()

    def touch(self) -> None:
        """Touch the file now (an I/O error is logged, never raised)."""
        try:
            self.path.touch()
        except OSError as exc:
            logging.getLogger(__name__).warning(
                "Could not touch the health file %s: %s", self.path, exc
            )

    def clear(self) -> None:
        """Remove the file (the worker stopped)."""
        self.path.unlink(missing_ok=True)


def health_file_age(path: str | os.PathLike[str]) -> float | None:
    """Seconds since ``path`` was last touched; ``None`` when it does not exist.

    .. versionadded:: 4.1
    """
    try:
        modified = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, time.time() - modified)
