"""``manage.py prune_domain_events``: delete old sent rows from the outbox."""

from __future__ import annotations

import argparse
import math
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections

from ...outbox import prune_sent_events

#: Sent rows younger than this are kept, by default (useful when investigating).
DEFAULT_KEEP_DAYS = 7.0


def days(text: str) -> float:
    """A finite, non-negative number of days."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite, non-negative number of days, not {text}"
        )
    return value


class Command(BaseCommand):
    help = "Delete outbox rows sent more than --days days ago. Pending rows are never deleted."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=days,
            default=DEFAULT_KEEP_DAYS,
            help="Keep rows sent less than this many days ago (default: %(default)s).",
        )
        parser.add_argument(
            "--database", default=None, help="The database alias (default: the router's choice)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        keep_days: float = options["days"]
        database: str | None = options["database"]
        if database is not None and database not in connections:
            raise CommandError(f"no database {database!r} in settings.DATABASES")
        try:
            older_than = timedelta(days=keep_days)
        except OverflowError:  # more days than a timedelta holds: nothing is that old
            older_than = timedelta.max
        try:
            deleted = prune_sent_events(older_than, using=database)
        except DatabaseError as exc:
            raise CommandError(f"pruning the outbox failed: {exc}") from exc
        self.stdout.write(f"Deleted {deleted} sent domain event(s) older than {keep_days:g} day(s)")
