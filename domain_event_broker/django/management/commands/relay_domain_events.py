"""``manage.py relay_domain_events``: publish the transactional outbox."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from ...._amqp.config import UNSET
from ...._cli.arguments import positive_int, positive_seconds
from ...._core.signals import graceful_stop
from ....errors import DomainEventBrokerError
from ...outbox import failed_events, retry_failed_events
from ...relay import DEFAULT_BATCH_SIZE, DEFAULT_POLL_INTERVAL, OutboxRelay

#: Exit status of ``--once`` when every publishable row was relayed but some
#: rows were set aside as failed (1 means relaying failed).
EXIT_ROWS_SET_ASIDE = 2


def _row_id(text: str) -> int:
    """An outbox row id: a whole number a database column can hold."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a row id: {text!r}") from None
    if not 1 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"not a row id: {text} (ids run from 1 to 2**63-1)")
    return value


class Command(BaseCommand):
    help = (
        "Publish the domain events waiting in the transactional outbox, in order, "
        "and mark them sent. Runs until SIGTERM or SIGINT unless --once is given. "
        "Rows that cannot be published are set aside as failed: --list-failed shows "
        "them, --retry-failed makes them pending again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help=(
                "Publish what is pending now, then exit (exit status 1 on a failure, 2 when "
                "rows were set aside as failed)."
            ),
        )
        parser.add_argument(
            "--list-failed",
            action="store_true",
            help="List the rows set aside as failed, with their reason, then exit.",
        )
        parser.add_argument(
            "--retry-failed",
            nargs="*",
            type=_row_id,
            metavar="ID",
            default=None,
            help=(
                "Make the rows set aside as failed pending again (the given ids, or all), "
                "then exit. Fix their body first."
            ),
        )
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="The database alias whose outbox to relay (default: %(default)s).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help="Rows published per database transaction (default: %(default)s).",
        )
        parser.add_argument(
            "--interval",
            type=positive_seconds,
            default=DEFAULT_POLL_INTERVAL,
            help="Seconds between two looks at an empty outbox (default: %(default)s).",
        )
        parser.add_argument(
            "--max-message-size",
            type=positive_int,
            default=None,
            metavar="BYTES",
            help=(
                "The broker's max_message_size: rows whose event is larger are set aside "
                "without being published (default: learned from the broker when it "
                "refuses one)."
            ),
        )
        parser.add_argument(
            "--timeout",
            type=positive_seconds,
            default=None,
            help=(
                "Seconds one batch may take, reconnecting included, before the relay "
                "backs off and retries (default: the library's, 30). SIGTERM waits for "
                "the publish in progress, so at most this long."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        database: str = options["database"]
        if database not in connections:
            raise CommandError(f"no database {database!r} in settings.DATABASES")
        if options["list_failed"]:
            self._list_failed(database)
            return
        if options["retry_failed"] is not None:
            ids = options["retry_failed"] or None
            try:
                count = retry_failed_events(ids, using=database)
            except DatabaseError as exc:
                raise CommandError(f"the outbox's database {database!r} failed: {exc}") from exc
            self.stdout.write(f"{count} failed row(s) made pending again")
            return
        try:
            relay = OutboxRelay(
                using=database,
                batch_size=options["batch_size"],
                timeout=UNSET if options["timeout"] is None else options["timeout"],
                max_message_size=options["max_message_size"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        with relay:
            if options["once"]:
                self._relay_once(relay)
                return
            self._run_until_stopped(relay, options["interval"])

    def _relay_once(self, relay: OutboxRelay) -> None:
        try:
            relay.run(once=True)
        except DatabaseError as exc:
            raise CommandError(
                f"relaying the outbox failed after {relay.relayed} domain event(s): "
                f"the outbox's database {relay.using!r} failed: {exc}"
            ) from exc
        except DomainEventBrokerError as exc:
            raise CommandError(
                f"relaying the outbox failed after {relay.relayed} domain event(s): "
                f"publishing failed: {exc}"
            ) from exc
        self.stdout.write(f"Relayed {relay.relayed} domain event(s){_set_aside(relay)}")
        if relay.set_aside:
            raise CommandError(
                f"{relay.set_aside} outbox row(s) could not be published and were set "
                f"aside as failed (see relay_domain_events --list-failed)",
                returncode=EXIT_ROWS_SET_ASIDE,
            )

    def _list_failed(self, database: str) -> None:
        count = 0
        try:
            for row in failed_events(using=database):
                count += 1
                self.stdout.write(
                    f"{row.id}\t{row.routing_key}\t{row.uuid_string}\t"
                    f"{row.failed_at:%Y-%m-%d %H:%M:%S}\t{row.failure_reason}"
                )
        except DatabaseError as exc:
            raise CommandError(f"the outbox's database {database!r} failed: {exc}") from exc
        self.stdout.write(f"{count} row(s) set aside as failed")

    def _run_until_stopped(self, relay: OutboxRelay, interval: float) -> None:
        stop = threading.Event()
        with graceful_stop(stop.set, what="stopping after the batch being relayed"):
            self.stdout.write(f"Relaying the outbox of database {relay.using!r}", ending="\n")
            self.stdout.flush()
            count = relay.run(poll_interval=interval, stop=stop)
        self.stdout.write(f"Stopped after relaying {count} domain event(s){_set_aside(relay)}")


def _set_aside(relay: OutboxRelay) -> str:
    if not relay.set_aside:
        return ""
    return f"; {relay.set_aside} row(s) could not be published and were set aside as failed"
