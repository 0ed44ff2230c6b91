"""The interactive replay prompt, shared by ``replay --interactive`` and the Django command.

:class:`InteractivePrompt` shows one dead letter and asks what to do with it;
:class:`AnswerReader` waits for the answer while keeping the broker
connection alive.
"""

from __future__ import annotations

import json
import math
import os
import select
import sys
from collections.abc import Callable
from typing import Any, Final

import pika

from .._core import headers as _headers
from .._deadletters import operations as replay

__all__ = ["DEFAULT_ANSWER_TIMEOUT", "AnswerReader", "InteractivePrompt"]

#: Seconds the interactive prompt waits for an answer before leaving the event.
DEFAULT_ANSWER_TIMEOUT: Final = 30.0
#: Longest wait for input between two services of the broker connection (s).
KEEPALIVE_INTERVAL: Final = 1.0
#: The question asked for each event (3.0.2's words).
QUESTION: Final = "(R)eplay, (D)iscard or (L)eave? "
#: The answers understood, in any case, and what they do. Anything else is
#: asked again: a typo must never discard an event.
ANSWERS: Final = {
    "r": replay.RETRY,
    "replay": replay.RETRY,
    "d": replay.DISCARD,
    "discard": replay.DISCARD,
    "l": replay.LEAVE,
    "leave": replay.LEAVE,
}
#: Said after an answer that is not one of :data:`ANSWERS`.
ANSWER_HELP: Final = "answer r (replay), d (discard) or l (leave); an empty answer leaves it."


class AnswerReader:
    """Reads one line from standard input within a deadline, while keeping
    the broker connection alive.

    It waits with ``select.select([sys.stdin], ...)`` in slices of at most
    :data:`KEEPALIVE_INTERVAL` seconds and calls ``keepalive`` between them,
    since a blocking pika connection sends heartbeats only when called.
    ``sys.stdin`` and ``select.select`` are looked up at each call (tests
    replace them). A real file descriptor is read directly, line by line, so
    that several answers piped in at once are not swallowed by Python's
    buffering.

    Args:
        interval: the slice length in seconds.
    """

    def __init__(self, interval: float = KEEPALIVE_INTERVAL) -> None:
        self._interval = interval
        self._pending = b""
        #: Whether the input has ended (nothing more will come).
        self.at_end = False

    def read_line(self, timeout: float, keepalive: Callable[[], None] | None = None) -> str | None:
        """Wait for the next line of standard input.

        Args:
            timeout: seconds to wait, at most (counted in slices).
            keepalive: called between slices while nothing comes, e.g. to
                send the broker connection's heartbeats.

        Returns:
            The line without its line ending, ``""`` at the end of the
            input, or ``None`` when nothing came within ``timeout``.
        """
        if b"\n" in self._pending:
            return self._take_line()
        stream = sys.stdin
        fd = _fileno(stream)
        # Count slices rather than read the clock, so that a select() that
        # returns at once (a closed terminal, a test double) cannot spin.
        for _ in range(max(1, math.ceil(timeout / self._interval))):
            ready, _, _ = select.select([stream], [], [], min(self._interval, max(timeout, 0)))
            if ready:
                if fd is None:
                    text = stream.readline()
                    self.at_end = not text
                    return text.rstrip("\r\n")
                chunk = os.read(fd, 4096)
                if not chunk:  # end of input: what is left, else ""
                    self.at_end = True
                    line, self._pending = self._pending, b""
                    return line.decode("utf-8", "replace").rstrip("\r\n")
                self._pending += chunk
                if b"\n" in self._pending:
                    return self._take_line()
            elif keepalive is not None:
                keepalive()
        return None

    def _take_line(self) -> str:
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")


def _fileno(stream: object) -> int | None:
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # StringIO and friends
        return None
    return fd if isinstance(fd, int) else None


def _default_write(text: str, ending: str) -> None:
    sys.stdout.write(text + ending)
    sys.stdout.flush()


class InteractivePrompt:
    """A replay callback that asks the operator what to do with each event.

    Shows the event pretty-printed (indented by 4, sorted keys), optionally
    its failure reason, then asks ``(R)eplay, (D)iscard or (L)eave?``. The
    answers are ``r``/``replay``, ``d``/``discard`` and ``l``/``leave``, in
    any case (see :data:`ANSWERS`); anything else is asked again. No answer
    within ``timeout`` seconds, an empty answer, or the end of the input
    leaves the event. The texts are 3.0.2's ``replay_domain_event``'s.

    Args:
        write: called with a text and its line ending; default: standard output.
        timeout: seconds to wait for an answer.
        show_reason: also print why the event was dead-lettered.
        reader: where answers come from; default: standard input.
    """

    def __init__(
        self,
        write: Callable[[str, str], None] = _default_write,
        *,
        timeout: float = DEFAULT_ANSWER_TIMEOUT,
        show_reason: bool = False,
        reader: AnswerReader | None = None,
    ) -> None:
        self._write = write
        self._timeout = timeout
        self._show_reason = show_reason
        self._reader = reader or AnswerReader()
        self._retried = False
        self._done = replay.ReplayResult()

    def __call__(
        self,
        body: bytes,
        header: pika.BasicProperties | None = None,
        keepalive: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> str:
        """Show one event and ask what to do with it.

        Args:
            body: the dead letter's body.
            header: its AMQP properties (for the failure reason).
            keepalive: services the broker connection while waiting.
            **kwargs: the other replay callback arguments (unused).

        Returns:
            :data:`~domain_event_broker.replay.RETRY`,
            :data:`~domain_event_broker.replay.DISCARD` or
            :data:`~domain_event_broker.replay.LEAVE`.
        """
        if getattr(self._reader, "at_end", False):
            return replay.LEAVE  # the input ended: leave the rest without showing it
        self._write("Please specify action for:", "\n")
        self._write(_pretty(body), "\n")
        if self._show_reason:
            headers = (header.headers if header is not None else None) or {}
            self._write(
                f"Failed: {replay.failure_reason(header)} (after "
                f"{_headers.retry_count(headers)} retries{_handler_text(headers)})",
                "\n",
            )
        while True:
            self._write(QUESTION, "")
            answer = self._reader.read_line(self._timeout, keepalive)
            if answer is None:
                self._write("Timed out. Message left in queue.", "\n")
                return replay.LEAVE
            answer = answer.strip()
            if not answer:  # also the end of the input: the events after it are not shown
                self._write("Message left in queue.", "\n")
                return replay.LEAVE
            # Case is ignored in ASCII only: casefold() would read a long s as "s".
            choice = ANSWERS.get(answer.lower()) if answer.isascii() else None
            if choice == replay.RETRY:
                # Said once the broker took the copy: see progress().
                self._retried = True
                return replay.RETRY
            if choice == replay.DISCARD:
                self._write("Message has been discarded.", "\n")
                return replay.DISCARD
            if choice == replay.LEAVE:
                self._write("Message left in queue.", "\n")
                return replay.LEAVE
            self._write(f"Unknown answer {answer[:40]!r}: {ANSWER_HELP}", "\n")

    def progress(self, so_far: replay.ReplayResult, total: int) -> None:
        """Report the outcome of a replay answer once it is carried out: pass
        this as the run's ``on_progress``.

        Args:
            so_far: the counts of the run so far.
            total: the events the run covers (unused).
        """
        before, self._done = self._done, so_far
        if not self._retried:
            return
        if so_far.replayed > before.replayed:
            self._retried = False
            self._write("Message is returned to worker queue.", "\n")
        elif so_far.unroutable > before.unroutable:
            self._retried = False
            self._write(
                "Message could not be returned to the worker queue (no queue is bound for "
                "its routing key); left in queue.",
                "\n",
            )


def _handler_text(headers: dict[str, Any]) -> str:
    handler = headers.get("x-failed-handler")
    if isinstance(handler, bytes):
        handler = handler.decode("utf-8", "replace")
    return f", in {handler}" if isinstance(handler, str) and handler else ""


def _pretty(body: bytes) -> str:
    """The body as JSON indented by 4 with sorted keys, else as text."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return f"(not JSON) {body.decode('utf-8', 'replace')}"
    return json.dumps(payload, indent=4, sort_keys=True)
