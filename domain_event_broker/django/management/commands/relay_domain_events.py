"""``manage.py relay_domain_events``: publish the transactional outbox."""

from __future__ import annotations

import argparse
import math
import signal
import threading
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError

from ...._config import UNSET
from ....errors import DomainEventBrokerError
from ...relay import DEFAULT_BATCH_SIZE, DEFAULT_POLL_INTERVAL, OutboxRelay

#: Signals that stop the long-running relay gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


class Command(BaseCommand):
    help = (
        "Publish the domain events waiting in the transactional outbox, in order, "
        "and mark them sent. Runs until SIGTERM or SIGINT unless --once is given."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Publish what is pending now, then exit (exit status 1 on a failure).",
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
            type=_positive_float,
            default=DEFAULT_POLL_INTERVAL,
            help="Seconds between two looks at an empty outbox (default: %(default)s).",
        )
        parser.add_argument(
            "--timeout",
            type=_positive_float,
            default=None,
            help=(
                "Seconds one publish may take, reconnecting included, before the relay "
                "backs off and retries (default: the library's, 30). SIGTERM waits for "
                "the publish in progress, so at most this long."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            relay = OutboxRelay(
                using=options["database"],
                batch_size=options["batch_size"],
                timeout=UNSET if options["timeout"] is None else options["timeout"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        with relay:
            if options["once"]:
                try:
                    count = relay.run(once=True)
                except (DomainEventBrokerError, DatabaseError) as exc:
                    raise CommandError(f"relaying the outbox failed: {exc}") from exc
                self.stdout.write(f"Relayed {count} domain event(s)")
                return
            self._run_until_stopped(relay, options["interval"])

    def _run_until_stopped(self, relay: OutboxRelay, interval: float) -> None:
        stop = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {}
        if threading.current_thread() is threading.main_thread():  # else signal() raises
            previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
        try:
            self.stdout.write(f"Relaying the outbox of database {relay.using!r}", ending="\n")
            self.stdout.flush()
            count = relay.run(poll_interval=interval, stop=stop)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.stdout.write(f"Stopped after relaying {count} domain event(s)")
