"""Graceful stop on SIGTERM and SIGINT, for the worker and the outbox relay.

The first signal asks the running loop to stop after what it is doing; a
second one stops at once (``SystemExit(128 + signum)``, or
``KeyboardInterrupt`` for SIGINT), for a handler that hangs.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Final

__all__ = ["STOP_SIGNALS", "graceful_stop"]

log = logging.getLogger(__name__)

#: Signals that stop a worker gracefully.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def graceful_stop(
    request_stop: Callable[[], None],
    *,
    what: str = "stopping after the running handler",
    on_force: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Install stop-signal handlers for the duration of the block.

    Only in the main thread (Python delivers signals there); elsewhere this
    does nothing. The previous handlers are restored on exit.

    Args:
        request_stop: called (in the signal handler: keep it to setting
            flags) on the first signal.
        what: what the INFO line says happens next.
        on_force: called on a second signal, before it raises.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    requested = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal requested
        if requested:
            if on_force is not None:
                on_force()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        requested = True
        log.info("Received signal %d: %s", signum, what)
        request_stop()

    previous: dict[int, Any] = {}
    try:
        for stop_signal in STOP_SIGNALS:
            previous[stop_signal] = signal.signal(stop_signal, on_signal)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
