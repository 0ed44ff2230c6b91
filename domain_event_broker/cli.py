"""The ``domain-event-broker`` command-line tool, for operators.

::

    domain-event-broker [--url URL] [--verbose] COMMAND ...

    publish ROUTING_KEY [JSON]   publish an event (JSON data from stdin if left out)
    inspect NAME [--limit N] [--json]
                                 show handler NAME's dead letters, leaving them
    replay NAME [--all] [--interactive] [--limit N]
                                 move dead letters back to handler NAME
    status NAME [--delay SECONDS] [--json]
                                 message and consumer counts of NAME's queues

The broker is ``--url``, else the ``DOMAIN_EVENT_BROKER`` environment
variable, else ``amqp://guest:guest@localhost:5672/%2F``. Exit status: 0 on
success, 1 on an error, 2 on wrong usage, 130 when interrupted.

This module also holds the interactive prompt shared with the Django
management command ``replay_domain_event``.

.. versionadded:: 4.0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

import pika

from . import _headers, _migrate, replay
from ._config import UNSET, ConnectionSettings
from .errors import ConfigurationError, DomainEventBrokerError
from .events import DomainEvent
from .publish import Publisher

__all__ = ["AnswerReader", "InteractivePrompt", "main"]

PROG: Final = "domain-event-broker"

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: Seconds the interactive prompt waits for an answer before leaving the event.
DEFAULT_ANSWER_TIMEOUT: Final = 30.0
#: Longest wait for input between two services of the broker connection (s).
KEEPALIVE_INTERVAL: Final = 1.0
#: Seconds between two progress lines of a long replay.
DEFAULT_PROGRESS_INTERVAL: Final = 1.0
#: Dead letters ``inspect`` shows when no ``--limit`` is given.
DEFAULT_INSPECT_LIMIT: Final = 20
#: Longest event data ``inspect`` prints per event (characters).
MAX_DATA_CHARS: Final = 200


class UsageError(Exception):
    """Wrong usage detected after parsing: exit status 2."""


# -- the interactive prompt (shared with the Django command) -------------------


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
                    return stream.readline().rstrip("\r\n")
                chunk = os.read(fd, 4096)
                if not chunk:  # end of input: what is left, else ""
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
    its failure reason, then asks ``(R)eplay, (D)iscard or (L)eave?``. No
    answer within ``timeout`` seconds, an empty answer, or an unknown one
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
        self._write("Please specify action for:", "\n")
        self._write(_pretty(body), "\n")
        if self._show_reason:
            headers = (header.headers if header is not None else None) or {}
            self._write(
                f"Failed: {replay.failure_reason(header)} (after "
                f"{_headers.retry_count(headers)} retries{_handler_text(headers)})",
                "\n",
            )
        self._write("(R)eplay, (D)iscard or (L)eave? ", "")
        answer = self._reader.read_line(self._timeout, keepalive)
        if answer is None:
            self._write("Timed out. Message left in queue.", "\n")
            return replay.LEAVE
        answer = answer.strip()
        if not answer:
            self._write("Message left in queue.", "\n")
            return replay.LEAVE
        choice = answer[0].upper()
        if choice == "R":
            self._write("Message is returned to worker queue.", "\n")
            return replay.RETRY
        if choice == "D":
            self._write("Message has been discarded.", "\n")
            return replay.DISCARD
        self._write("Message left in queue.", "\n")
        return replay.LEAVE


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


# -- commands ---------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> ConnectionSettings:
    url: str | None = args.url
    return UNSET if url is None else url


def _cmd_publish(args: argparse.Namespace, out: TextIO) -> int:
    text = args.json if args.json is not None and args.json != "-" else sys.stdin.read()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the event data is not valid JSON: {exc}") from None
    event = DomainEvent(
        routing_key=args.routing_key, data=data, domain_object_id=args.domain_object_id
    )
    with Publisher(_settings(args)) as publisher:
        try:
            publisher.publish_event(event)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, DomainEventBrokerError):
                raise
            raise UsageError(str(exc)) from None
    out.write(f"published {event.routing_key} {event.uuid_string}\n")
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    limit: int | None = args.limit if args.limit is not None else (None if args.all else 1)
    callback: replay.MessageCallback = replay.retry_event
    on_progress = None
    if args.interactive:

        def write(text: str, ending: str) -> None:
            out.write(text + ending)
            out.flush()

        callback = InteractivePrompt(write, timeout=args.timeout, show_reason=True)
    else:
        on_progress = _ProgressPrinter(args.name, args.progress_interval, sys.stderr)
    result = replay.replay_dead_letters(
        args.name, callback, _settings(args), limit=limit, on_progress=on_progress
    )
    out.write(
        f"{args.name}: replayed {result.replayed}, discarded {result.discarded}, "
        f"left {result.left}; {result.remaining} dead letter(s) remaining in "
        f"{args.name}-dl\n"
    )
    return EXIT_OK


class _ProgressPrinter:
    """Prints a progress line at most every ``interval`` seconds."""

    def __init__(self, name: str, interval: float, stream: TextIO) -> None:
        self._name = name
        self._interval = interval
        self._stream = stream
        self._last = time.monotonic()

    def __call__(self, so_far: replay.ReplayResult, total: int) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        self._last = now
        self._stream.write(
            f"{self._name}: {so_far.offered}/{total} (replayed {so_far.replayed}, "
            f"discarded {so_far.discarded}, left {so_far.left})\n"
        )
        self._stream.flush()


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    letters = replay.inspect_dead_letters(args.name, settings, limit=args.limit)
    now = time.time()
    if args.json:
        out.write(json.dumps([letter.as_dict(now) for letter in letters], indent=2) + "\n")
        return EXIT_OK
    total = replay.handler_status(args.name, settings).dead_letter_queue.messages or len(letters)
    queue = f"{args.name}-dl"
    if not letters:
        out.write(f"{queue}: no dead letters\n")
        return EXIT_OK
    out.write(f"{queue}: {total} dead letter(s), showing the oldest {len(letters)}\n")
    for number, letter in enumerate(letters, 1):
        out.write(
            f"{number}. {letter.routing_key}  uuid {letter.uuid_string or '-'}  "
            f"age {_duration(letter.age(now))}  retries {letter.retry_count}\n"
        )
        handler = f" (in {letter.failed_handler})" if letter.failed_handler else ""
        out.write(f"   failed: {letter.reason}{handler}\n")
        if letter.event is not None:
            data = json.dumps(letter.event.data, sort_keys=True)
        else:
            data = "(not a domain event) " + letter.body.decode("utf-8", "replace")
        if len(data) > MAX_DATA_CHARS:
            data = data[: MAX_DATA_CHARS - 3] + "..."
        out.write(f"   data: {data}\n")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    status = replay.handler_status(args.name, _settings(args), delays=args.delay or ())
    if args.json:
        out.write(json.dumps(status.as_dict(), indent=2) + "\n")
    if not status.queue.exists and not status.dead_letter_queue.exists:
        raise DomainEventBrokerError(f"no handler named {args.name!r}: its queue does not exist")
    if args.json:
        return EXIT_OK
    rows = [("queue", status.queue), ("dead letters", status.dead_letter_queue)]
    rows += [("delayed retries", queue) for queue in status.delay_queues]
    width = max(len(queue.name) for _, queue in rows)
    for label, queue in rows:
        if not queue.exists:
            out.write(f"{label:<16} {queue.name:<{width}}  (none)\n")
            continue
        consumers = f"  {queue.consumers} consumer(s)" if label == "queue" else ""
        out.write(f"{label:<16} {queue.name:<{width}}  {queue.messages} message(s){consumers}\n")
    return EXIT_OK


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# -- parsing ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``domain-event-broker`` command."""

    def common(suppress: bool) -> argparse.ArgumentParser:
        # Global options work before and after the command name.
        default: Any = argparse.SUPPRESS if suppress else None
        parent = argparse.ArgumentParser(add_help=False)
        parent.add_argument(
            "--url",
            default=default,
            help="AMQP URL of the broker (default: $DOMAIN_EVENT_BROKER, else localhost)",
        )
        parent.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS if suppress else False,
            help="log what happens, and show tracebacks of errors",
        )
        return parent

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish domain events, and inspect and replay dead-lettered ones.",
        parents=[common(suppress=False)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub = [common(suppress=True)]

    publish = commands.add_parser("publish", parents=sub, help="publish a domain event")
    publish.add_argument("routing_key", metavar="ROUTING_KEY", help="e.g. user.registered")
    publish.add_argument(
        "json", metavar="JSON", nargs="?", help="the event data (default: read standard input)"
    )
    publish.add_argument("--domain-object-id", help="the id of the domain object concerned")
    publish.set_defaults(run=_cmd_publish)

    replay_cmd = commands.add_parser(
        "replay", parents=sub, help="move dead letters back to their handler"
    )
    replay_cmd.add_argument("name", metavar="NAME", help="the handler (queue) name")
    replay_cmd.add_argument("--all", action="store_true", help="replay every dead letter")
    replay_cmd.add_argument(
        "--interactive", action="store_true", help="ask (R)eplay, (D)iscard or (L)eave for each"
    )
    replay_cmd.add_argument(
        "--limit", type=_positive_int, help="at most N events (default: 1, or all with --all)"
    )
    replay_cmd.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_ANSWER_TIMEOUT,
        help="seconds to wait for an answer before leaving the event (default: %(default)g)",
    )
    replay_cmd.add_argument(
        "--progress-interval",
        type=_seconds,
        default=DEFAULT_PROGRESS_INTERVAL,
        metavar="SECONDS",
        help="seconds between progress lines on standard error (default: %(default)g)",
    )
    replay_cmd.set_defaults(run=_cmd_replay)

    inspect = commands.add_parser(
        "inspect", parents=sub, help="show dead letters without removing them"
    )
    inspect.add_argument("name", metavar="NAME", help="the handler (queue) name")
    inspect.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_INSPECT_LIMIT,
        help="show at most N (default: %(default)s)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_cmd_inspect)

    status = commands.add_parser("status", parents=sub, help="message counts of a handler")
    status.add_argument("name", metavar="NAME", help="the handler (queue) name")
    status.add_argument(
        "--delay",
        type=_seconds,
        action="append",
        metavar="SECONDS",
        help="a retry delay the handler uses, to find its delay queue (repeatable; "
        f"{replay.DEFAULT_RETRY_DELAY:g} is always looked at)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_cmd_status)

    _migrate.add_parser(commands, parents=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 error, 2 wrong usage, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    run: Callable[[argparse.Namespace, TextIO], int] = args.run
    try:
        return run(args, sys.stdout)
    except (UsageError, ConfigurationError) as exc:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted; unanswered events stay where they were\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # one clear line for any error, not a traceback
        if args.verbose:
            logging.getLogger(__name__).error("Command failed", exc_info=exc)
        sys.stderr.write(f"{PROG}: error: {_describe(exc)}\n")
        if not args.verbose:
            sys.stderr.write(f"{PROG}: (run with --verbose for details)\n")
        return EXIT_ERROR


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DomainEventBrokerError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
