"""The command line's parser and commands (:mod:`domain_event_broker.cli` documents them)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

from .._amqp import config as _config
from .._amqp.config import UNSET, ConnectionSettings
from .._amqp.session import ConnectionInfo, connection_info
from .._core.version import __version__
from .._deadletters import operations as replay
from .._publishing.publisher import Publisher
from ..errors import ConfigurationError, DomainEventBrokerError
from ..events import DomainEvent
from . import arguments as _arguments
from . import migrate as _migrate
from . import worker as _worker_command
from .prompt import DEFAULT_ANSWER_TIMEOUT, InteractivePrompt

__all__ = ["main"]

PROG: Final = "domain-event-broker"

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

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


def _connection_info(settings: ConnectionSettings) -> ConnectionInfo:
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
    kind = type(exc)
    # A qualified name where the bare one says little (struct.error is "error").
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"{name}: {exc}"
