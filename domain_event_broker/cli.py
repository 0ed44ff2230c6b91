"""The ``domain-event-broker`` command-line tool, for operators.

::

    domain-event-broker [--url URL] [--connect-timeout SECONDS] [--verbose] COMMAND ...
    domain-event-broker --version

    publish ROUTING_KEY [JSON]   publish an event (JSON data from stdin if left out)
    inspect NAME [--limit N] [--json] [--summary [FILTERS]]
                                 show handler NAME's dead letters, leaving them
    replay NAME [--all] [--interactive] [--limit N] [FILTERS] [--dry-run]
                                 move dead letters back to handler NAME
    discard NAME (--all | FILTERS) [--limit N] [--export FILE] [--dry-run]
                                 remove dead letters for good
    export NAME FILE [FILTERS]   write dead letters to FILE (JSON lines), leaving them
    import NAME FILE             put exported dead letters back
    status NAME [--delay SECONDS] [--json]
                                 message and consumer counts of NAME's queues

FILTERS: ``--where exception=TYPE``, ``--where handler=NAME``,
``--routing-key PATTERN`` (``--where routing_key=PATTERN``), ``--older-than
AGE``, ``--newer-than AGE`` (ages such as ``90s``, ``15m``, ``1h``, ``2d``).

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

from . import __version__, _arguments, _config, _headers, _migrate, _tls, _worker_command, replay
from ._config import UNSET, ConnectionSettings
from ._connection import connection_info
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
#: Seconds between two redraws of a progress bar on a terminal.
TTY_REFRESH: Final = 0.2
#: Values shown per field of a summary.
SUMMARY_ROWS: Final = 10
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
        self._write("(R)eplay, (D)iscard or (L)eave? ", "")
        answer = self._reader.read_line(self._timeout, keepalive)
        if answer is None:
            self._write("Timed out. Message left in queue.", "\n")
            return replay.LEAVE
        answer = answer.strip()
        if not answer:  # also the end of the input: the events after it are not shown
            self._write("Message left in queue.", "\n")
            return replay.LEAVE
        choice = answer[0].upper()
        if choice == "R":
            # Said once the broker took the copy: see progress().
            self._retried = True
            return replay.RETRY
        if choice == "D":
            self._write("Message has been discarded.", "\n")
            return replay.DISCARD
        self._write("Message left in queue.", "\n")
        return replay.LEAVE

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


# -- commands ---------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> ConnectionSettings:
    url: str | None = args.url
    return UNSET if url is None else url


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _cmd_publish(args: argparse.Namespace, out: TextIO) -> int:
    text = args.json if args.json is not None and args.json != "-" else sys.stdin.read()
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise UsageError("the event data is not valid JSON: nested too deeply") from None
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


def _filter(args: argparse.Namespace) -> replay.DeadLetterFilter:
    """The dead-letter filter the command line asks for."""
    fields: dict[str, list[str]] = {"exception": [], "handler": [], "routing_key": []}
    for clause in args.where or ():
        key, sep, value = clause.partition("=")
        key = key.strip().replace("-", "_")
        if key in ("routing", "key"):
            key = "routing_key"
        if not sep or key not in fields or not value:
            raise UsageError(
                f"--where {clause!r}: expected exception=TYPE, handler=NAME or routing_key=PATTERN"
            )
        fields[key].append(value)
    fields["routing_key"] += args.routing_key or []
    try:
        return replay.DeadLetterFilter(
            exception=fields["exception"],
            handler=fields["handler"],
            routing_key=fields["routing_key"],
            older_than=args.older_than,
            newer_than=args.newer_than,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _counts_text(result: replay.ReplayResult) -> str:
    text = f"replayed {result.replayed}, discarded {result.discarded}, left {result.left}"
    if result.skipped:
        text += f", skipped {result.skipped}"
    if result.unroutable:
        text += f", not replayable {result.unroutable}"
    return text


class _Tracker:
    """Keeps the latest counts of a run, and shows its progress on standard
    error: a bar redrawn in place on a terminal, else a line at most every
    ``interval`` seconds (none for a short run)."""

    def __init__(
        self,
        name: str,
        interval: float,
        stream: TextIO,
        *,
        tty: bool | None = None,
        then: Callable[[replay.ReplayResult, int], None] | None = None,
    ) -> None:
        self.name = name
        self.latest = replay.ReplayResult()
        self._interval = interval
        self._stream = stream
        self._tty = _isatty(stream) if tty is None else tty
        self._then = then
        self._last = time.monotonic()
        self._drawn = False

    def __call__(self, so_far: replay.ReplayResult, total: int) -> None:
        self.latest = so_far
        if self._then is not None:
            self._then(so_far, total)
        now = time.monotonic()
        if self._tty:
            if now - self._last < TTY_REFRESH and so_far.visited < total:
                return
        elif now - self._last < self._interval:
            return
        self._last = now
        if self._tty:
            width = 30
            done = width * so_far.visited // total if total else width
            percent = 100 * so_far.visited // total if total else 100
            bar = "#" * done + "." * (width - done)
            self._stream.write(f"\r{self.name}: [{bar}] {so_far.visited}/{total} {percent:3d}%")
            self._drawn = True
        else:
            self._stream.write(f"{self.name}: {so_far.visited}/{total} ({_counts_text(so_far)})\n")
        self._stream.flush()

    def end(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _has_filter(where: replay.DeadLetterFilter) -> bool:
    return not where.matches_everything


def _cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    where = _filter(args)
    if args.dry_run:
        if args.interactive:
            raise UsageError("--dry-run and --interactive do not go together")
        return _dry_run(args, out, where, "replay")
    limit: int | None = args.limit
    if limit is None and not args.all and not _has_filter(where):
        limit = 1
    callback: replay.MessageCallback = replay.retry_event
    then = None
    if args.interactive:

        def write(text: str, ending: str) -> None:
            out.write(text + ending)
            out.flush()

        prompt = InteractivePrompt(write, timeout=args.timeout, show_reason=True)
        callback, then = prompt, prompt.progress
    if args.interactive:  # the prompt says what happened; no progress lines
        tracker = _Tracker(args.name, math.inf, sys.stderr, tty=False, then=then)
    else:
        tracker = _Tracker(args.name, args.progress_interval, sys.stderr)
    try:
        result = replay.replay_dead_letters(
            args.name, callback, _settings(args), limit=limit, on_progress=tracker, where=where
        )
    except replay.ReplayIncompleteError as exc:
        tracker.end()
        _write_summary(out, args.name, exc.result)
        raise
    except BaseException:
        tracker.end()
        if tracker.latest.visited:
            out.write(f"{args.name}: stopped after {_counts_text(tracker.latest)}\n")
            out.flush()
        raise
    tracker.end()
    _write_summary(out, args.name, result)
    return EXIT_OK


def _write_summary(out: TextIO, name: str, result: replay.ReplayResult) -> None:
    remaining = f"{result.remaining} dead letter(s) remaining in {name}-dl"
    out.write(f"{name}: {_counts_text(result)}; {remaining}\n")
    out.flush()


def _dry_run(
    args: argparse.Namespace, out: TextIO, where: replay.DeadLetterFilter, verb: str
) -> int:
    tracker = _Tracker(args.name, args.progress_interval, sys.stderr)
    try:
        summary = replay.summarize_dead_letters(
            args.name, _settings(args), where=where, on_progress=tracker
        )
    finally:
        tracker.end()
    chosen = summary.total if args.limit is None else min(summary.total, args.limit)
    out.write(
        f"{args.name}: would {verb} {chosen} of {summary.scanned} dead letter(s) "
        f"({where.describe()}); nothing was changed\n"
    )
    _write_summary_table(out, summary)
    return EXIT_OK


def _write_summary_table(out: TextIO, summary: replay.DeadLetterSummary) -> None:
    sections = (
        ("exception", summary.by_exception),
        ("handler", summary.by_handler),
        ("routing key", summary.by_routing_key),
    )
    for title, counter in sections:
        if not counter:
            continue
        out.write(f"  by {title}:\n")
        for value, count in counter.most_common(SUMMARY_ROWS):
            out.write(f"    {count:>9}  {value}\n")
        if len(counter) > SUMMARY_ROWS:
            rest = sum(count for _, count in counter.most_common()[SUMMARY_ROWS:])
            out.write(f"    {rest:>9}  ({len(counter) - SUMMARY_ROWS} more)\n")
    ages = summary.as_dict()["by_age"]
    if ages:
        out.write("  by age:\n")
        for label, count in ages.items():
            out.write(f"    {count:>9}  {label}\n")
    out.flush()


def _cmd_discard(args: argparse.Namespace, out: TextIO) -> int:
    where = _filter(args)
    if not args.all and not _has_filter(where):
        raise UsageError("say which dead letters to discard: --all, or filters such as --where")
    if args.dry_run:
        return _dry_run(args, out, where, "discard")
    tracker = _Tracker(args.name, args.progress_interval, sys.stderr)
    export = None
    try:
        if args.export is not None:
            export = open(args.export, "x", encoding="utf-8")  # noqa: SIM115  # closed below
        result = replay.discard_dead_letters(
            args.name,
            _settings(args),
            where=where,
            limit=args.limit,
            export_to=export,
            on_progress=tracker,
        )
    except FileExistsError:
        raise UsageError(f"{args.export} exists already; not overwriting it") from None
    except BaseException:
        tracker.end()
        if tracker.latest.visited:
            out.write(f"{args.name}: stopped after discarding {tracker.latest.discarded}\n")
        raise
    finally:
        if export is not None:
            export.close()
    tracker.end()
    saved = f" (saved to {args.export} first)" if args.export is not None else ""
    out.write(
        f"{args.name}: discarded {result.discarded}{saved}, kept {result.skipped}; "
        f"{result.remaining} dead letter(s) remaining in {args.name}-dl\n"
    )
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    where = _filter(args)
    tracker = _Tracker(args.name, args.progress_interval, sys.stderr)
    to_stdout = args.file == "-"
    try:
        file = out if to_stdout else open(args.file, "x", encoding="utf-8")  # noqa: SIM115
    except FileExistsError:
        raise UsageError(f"{args.file} exists already; not overwriting it") from None
    try:
        written = replay.export_dead_letters(
            args.name, file, _settings(args), where=where, on_progress=tracker
        )
    finally:
        tracker.end()
        if not to_stdout:
            file.close()
    message = f"{args.name}: exported {written} dead letter(s) to {args.file}, left in place\n"
    (sys.stderr if to_stdout else out).write(message)
    return EXIT_OK


def _cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    try:
        file = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    try:
        imported = replay.import_dead_letters(args.name, file, _settings(args))
    except ValueError as exc:
        if isinstance(exc, DomainEventBrokerError):
            raise
        raise UsageError(f"{args.file}: {exc}; nothing was imported") from None
    finally:
        if file is not sys.stdin:
            file.close()
    out.write(f"{args.name}: imported {imported} dead letter(s) into {args.name}-dl\n")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    if args.summary:
        return _inspect_summary(args, out)
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


def _inspect_summary(args: argparse.Namespace, out: TextIO) -> int:
    where = _filter(args)
    tracker = _Tracker(args.name, args.progress_interval, sys.stderr)
    try:
        summary = replay.summarize_dead_letters(
            args.name, _settings(args), where=where, on_progress=tracker
        )
    finally:
        tracker.end()
    if args.json:
        out.write(json.dumps(summary.as_dict(), indent=2) + "\n")
        return EXIT_OK
    picked = "" if where.matches_everything else f", {summary.total} matching {where.describe()}"
    out.write(f"{args.name}-dl: {summary.scanned} dead letter(s){picked}\n")
    _write_summary_table(out, summary)
    if summary.oldest is not None and summary.newest is not None:
        out.write(
            f"  oldest {_duration(summary.oldest)} ago, newest {_duration(summary.newest)} ago\n"
        )
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    status = replay.handler_status(args.name, _settings(args), delays=args.delay or ())
    link = _connection_info(_settings(args))
    if args.json:
        out.write(json.dumps({**status.as_dict(), "connection": link.as_dict()}, indent=2) + "\n")
    if not status.queue.exists and not status.dead_letter_queue.exists:
        raise DomainEventBrokerError(f"no handler named {args.name!r}: its queue does not exist")
    if args.json:
        return EXIT_OK
    rows = [("queue", status.queue), ("dead letters", status.dead_letter_queue)]
    rows += [("delayed retries", queue) for queue in status.delay_queues]
    labels = ["retry exchange", "dead-letter exchange"]
    width = max(len(name) for name in [*(queue.name for _, queue in rows), *status.exchanges])
    for label, queue in rows:
        if not queue.exists:
            out.write(f"{label:<20} {queue.name:<{width}}  (none)\n")
            continue
        consumers = f"  {queue.consumers} consumer(s)" if label == "queue" else ""
        out.write(f"{label:<20} {queue.name:<{width}}  {queue.messages} message(s){consumers}\n")
    for label, (exchange, exists) in zip(labels, status.exchanges.items(), strict=False):
        out.write(f"{label:<20} {exchange:<{width}}  {'exists' if exists else '(none)'}\n")
    if not status.delay_queues_listed:
        sys.stderr.write(
            f"{PROG}: note: the broker's management API did not answer, so delay queues "
            f"were looked up by delay only (10 s and --delay)\n"
        )
    out.write(f"{'connection':<20} {link.describe()}\n")
    return EXIT_OK


def _connection_info(settings: ConnectionSettings) -> _tls.ConnectionInfo:
    config = _config.resolve(settings)
    assert config is not None  # handler_status() refused None already
    return connection_info(config)


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


def _age(text: str) -> float:
    try:
        return replay.parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_filters(parser: argparse.ArgumentParser, note: str = "") -> None:
    group = parser.add_argument_group("filters" + note)
    group.add_argument(
        "--where",
        action="append",
        metavar="FIELD=VALUE",
        help="exception=TYPE (e.g. KeyError), handler=NAME or routing_key=PATTERN; "
        "repeatable: different fields must all match, values of one field any",
    )
    group.add_argument(
        "--routing-key",
        action="append",
        metavar="PATTERN",
        help="routing key pattern, topic-style: * one word, # any words (repeatable)",
    )
    group.add_argument(
        "--older-than", type=_age, metavar="AGE", help="dead-lettered at least AGE ago (e.g. 1h)"
    )
    group.add_argument(
        "--newer-than", type=_age, metavar="AGE", help="dead-lettered less than AGE ago"
    )


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress-interval",
        type=_arguments.non_negative_seconds,
        default=DEFAULT_PROGRESS_INTERVAL,
        metavar="SECONDS",
        help="seconds between progress lines on standard error when it is not a terminal "
        "(default: %(default)g)",
    )


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
        parent.add_argument(
            "--connect-timeout",
            type=_arguments.positive_seconds,
            default=default,
            metavar="SECONDS",
            help="give up connecting or publishing after this long, reconnecting "
            f"included (default: {_config.DEFAULT_TIMEOUT:g})",
        )
        return parent

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Publish domain events, and inspect, replay, discard, export and import "
        "dead-lettered ones.",
        parents=[common(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        "--limit",
        type=_arguments.positive_int,
        help="at most N events (default: 1, or all with --all or filters)",
    )
    replay_cmd.add_argument(
        "--timeout",
        type=_arguments.non_negative_seconds,
        default=DEFAULT_ANSWER_TIMEOUT,
        help="seconds to wait for an answer before leaving the event (default: %(default)g)",
    )
    replay_cmd.add_argument(
        "--progress-interval",
        type=_arguments.non_negative_seconds,
        default=DEFAULT_PROGRESS_INTERVAL,
        metavar="SECONDS",
        help="seconds between progress lines on standard error (default: %(default)g)",
    )
    replay_cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="count the dead letters the filters pick, change nothing",
    )
    _add_filters(replay_cmd)
    replay_cmd.set_defaults(run=_cmd_replay)

    discard = commands.add_parser(
        "discard", parents=sub, help="remove dead letters for good (optionally saving them)"
    )
    discard.add_argument("name", metavar="NAME", help="the handler (queue) name")
    discard.add_argument("--all", action="store_true", help="every dead letter the filters pick")
    discard.add_argument("--limit", type=_arguments.positive_int, help="at most N events")
    discard.add_argument(
        "--export",
        metavar="FILE",
        help="first write each one to FILE (JSON lines, as export does; FILE must not exist)",
    )
    discard.add_argument(
        "--dry-run", action="store_true", help="count what would be discarded, change nothing"
    )
    _add_progress(discard)
    _add_filters(discard)
    discard.set_defaults(run=_cmd_discard)

    export = commands.add_parser(
        "export", parents=sub, help="write dead letters to a file (JSON lines), leaving them"
    )
    export.add_argument("name", metavar="NAME", help="the handler (queue) name")
    export.add_argument("file", metavar="FILE", help="a new file, or - for standard output")
    _add_progress(export)
    _add_filters(export)
    export.set_defaults(run=_cmd_export)

    import_cmd = commands.add_parser(
        "import", parents=sub, help="put exported dead letters back into NAME-dl"
    )
    import_cmd.add_argument("name", metavar="NAME", help="the handler (queue) name")
    import_cmd.add_argument("file", metavar="FILE", help="written by export, or - for stdin")
    import_cmd.set_defaults(run=_cmd_import)

    inspect = commands.add_parser(
        "inspect", parents=sub, help="show dead letters without removing them"
    )
    inspect.add_argument("name", metavar="NAME", help="the handler (queue) name")
    inspect.add_argument(
        "--limit",
        type=_arguments.positive_int,
        default=DEFAULT_INSPECT_LIMIT,
        help="show at most N (default: %(default)s)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--summary",
        action="store_true",
        help="count all dead letters by exception, handler, routing key and age (one pass)",
    )
    _add_progress(inspect)
    _add_filters(inspect, note=" (with --summary)")
    inspect.set_defaults(run=_cmd_inspect)

    status = commands.add_parser("status", parents=sub, help="message counts of a handler")
    status.add_argument("name", metavar="NAME", help="the handler (queue) name")
    status.add_argument(
        "--delay",
        type=_arguments.non_negative_seconds,
        action="append",
        metavar="SECONDS",
        help="a retry delay the handler uses, to find its delay queue (repeatable; "
        f"{replay.DEFAULT_RETRY_DELAY:g} is always looked at)",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_cmd_status)
    _worker_command.add_parsers(commands, sub)  # worker, health
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
    previous_timeout = _config.default_timeout()
    try:
        if args.connect_timeout is not None:
            _config.configure(timeout=args.connect_timeout)
        return run(args, sys.stdout)
    except (UsageError, ConfigurationError) as exc:
        _command_parser(parser, args).print_usage(sys.stderr)
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
    finally:
        _config.configure(timeout=previous_timeout)


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The sub-parser of the command being run (for its usage line)."""
    for action in parser._actions:  # argparse keeps sub-parsers nowhere else
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(args.command, parser)
    return parser


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DomainEventBrokerError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
