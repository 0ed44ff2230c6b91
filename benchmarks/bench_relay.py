"""The outbox relay on PostgreSQL against raw pika's single-event confirmed rate.

Writes ``--events`` outbox rows (not timed) into a fresh PostgreSQL database,
then times ``OutboxRelay.run(once=True)`` publishing them all (batches of
``--batch-size`` rows, one confirm wait per batch, rows marked sent after the
confirms), against raw pika publishing the same bodies one at a time with
confirms, in the same run. Both publish persistently to ``domain-events``,
routed to a durable queue. Issue 12's targets: at least 2,000 events/s, and at
least 1.5x raw pika's single-event confirmed rate.

The database server: ``--dsn`` (libpq keywords; default the local test
server, ``host=127.0.0.1 user=postgres dbname=postgres``). A database named
``bench_deb_<pid>`` is created and dropped. ``--sqlite`` uses a temporary
SQLite file instead.

Usage: python benchmarks/bench_relay.py [--events 20000] [--batch-size 500] [--rounds 2]
"""

# ruff: noqa: PLC0415  # Django and the models are imported once settings are configured

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
from _common import EXCHANGE, URL, bound_queue, raw_channel

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def setup_django(database: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    settings.configure(
        INSTALLED_APPS=["domain_event_broker.django"],
        DATABASES={"default": database},
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DOMAIN_EVENT_BROKER=URL,
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def postgres_database(dsn: str) -> tuple[dict[str, Any], Any]:
    import psycopg

    name = f"bench_deb_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(dsn)

    def drop() -> None:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')

    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": params.get("user", "postgres"),
        "HOST": params.get("host", "127.0.0.1"),
        "PORT": params.get("port", "5432"),
        "PASSWORD": params.get("password", ""),
    }
    return database, drop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="outbox rows per round")
    parser.add_argument("--single", type=int, default=2000, help="raw single events per round")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--sqlite", action="store_true", help="relay from SQLite instead")
    args = parser.parse_args()

    if args.sqlite:
        path = Path(tempfile.gettempdir()) / f"bench_deb_{os.getpid()}.sqlite3"
        database: dict[str, Any] = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}

        def drop() -> None:
            path.unlink(missing_ok=True)

    else:
        try:
            database, drop = postgres_database(args.dsn)
        except Exception as exc:  # psycopg missing or no server: say so, do not fail `make bench`
            print(f"PostgreSQL not available ({type(exc).__name__}: {exc}); skipped (try --sqlite)")
            return 0
    try:
        setup_django(database)
        return run(args)
    finally:
        drop()


def run(args: argparse.Namespace) -> int:
    from django.db import transaction

    from domain_event_broker import DomainEvent
    from domain_event_broker.django.models import OutboxEvent
    from domain_event_broker.django.relay import OutboxRelay

    raw_seconds = relay_seconds = 0.0
    relayed = 0
    with bound_queue() as queue, OutboxRelay(batch_size=args.batch_size) as relay:
        connection, channel = raw_channel()
        properties = pika.BasicProperties(delivery_mode=2)
        body = DomainEvent(queue.key, {"n": 0}).to_json().encode("utf-8")
        for round_number in range(args.rounds):
            with transaction.atomic():
                OutboxEvent.objects.bulk_create(
                    [
                        OutboxEvent(
                            routing_key=event.routing_key,
                            uuid_string=event.uuid_string,
                            body=event.to_json(),
                        )
                        for event in (DomainEvent(queue.key, {"n": n}) for n in range(args.events))
                    ],
                    batch_size=1000,
                )
            started = time.perf_counter()
            count = relay.run(once=True)
            relay_seconds += time.perf_counter() - started
            relayed += count
            assert count == args.events, count
            assert queue.count() == args.events
            queue.purge()

            started = time.perf_counter()
            for _ in range(args.single):
                channel.basic_publish(EXCHANGE, queue.key, body, properties)
            raw_seconds += time.perf_counter() - started
            queue.purge()
            so_far = relayed / relay_seconds
            print(f"  round {round_number + 1}: relay {so_far:.0f} events/s so far", flush=True)
        connection.close()
    raw_rate = args.single * args.rounds / raw_seconds
    relay_rate = relayed / relay_seconds
    where = "SQLite" if args.sqlite else "PostgreSQL"
    print(f"broker {URL.split('@')[-1]}, {where}, batches of {args.batch_size}, durable queue")
    print(f"raw pika, one at a time with confirms: {raw_rate:8.0f} events/s")
    print(f"outbox relay ({relayed} rows):          {relay_rate:8.0f} events/s")
    print(
        f"ratio relay / raw single confirmed: {relay_rate / raw_rate:.1f} (targets: >= 1.5, "
        f"and >= 2000 events/s: {'met' if relay_rate >= 2000 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
