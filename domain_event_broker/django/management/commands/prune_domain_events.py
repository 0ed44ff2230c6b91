"""``manage.py prune_domain_events``: delete old sent rows from the outbox."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...outbox import prune_sent_events

#: Sent rows younger than this are kept, by default (useful when investigating).
DEFAULT_KEEP_DAYS = 7.0


class Command(BaseCommand):
    help = "Delete outbox rows sent more than --days days ago. Pending rows are never deleted."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=float,
            default=DEFAULT_KEEP_DAYS,
            help="Keep rows sent less than this many days ago (default: %(default)s).",
        )
        parser.add_argument(
            "--database", default=None, help="The database alias (default: the router's choice)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days: float = options["days"]
        if not days >= 0:
            raise CommandError(f"--days must not be negative, not {days}")
        deleted = prune_sent_events(timedelta(days=days), using=options["database"])
        self.stdout.write(f"Deleted {deleted} sent domain event(s) older than {days:g} day(s)")
