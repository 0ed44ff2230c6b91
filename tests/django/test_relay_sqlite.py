"""The relay on SQLite while the application holds the database: no storm of copies.

SQLite has one write lock for the whole database. An application
transaction that holds it (or a long read that keeps SQLite from committing)
must not make the relay publish a batch it then cannot mark, again and
again: at-least-once allows one more copy after a crash, not a storm.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import connections, transaction

from domain_event_broker.django.models import OutboxEvent
from domain_event_broker.django.outbox import publish_via_outbox

from ..helpers import wait_for
from .conftest import DATABASES
from .support import REPO_ROOT, EventQueue, manage_command

#: How long the relay's SQLite connection waits for a lock (the app's holds longer).
SQLITE_TIMEOUT = 0.5
#: How long the application holds the database in these tests (seconds).
HOLD = 6.0


def relay_env_with_timeout() -> dict[str, str]:
    """Environment for a relay subprocess on this test's SQLite database."""
    name = connections["default"].settings_dict["NAME"]
    database = {**DATABASES["default"], "NAME": name, "OPTIONS": {"timeout": SQLITE_TIMEOUT}}
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.django.settings",
        "DEB_TEST_DATABASES": json.dumps({"default": database}),
        "PYTHONPATH": str(REPO_ROOT),
    }


@contextmanager
def application_holding(kind: str) -> Iterator[None]:
    """The application, on a connection of its own, holding the database:
    ``writer``: in a transaction that wrote (SQLite's write lock);
    ``reader``: in a transaction that read (no one can commit a write)."""
    database = sqlite3.connect(
        connections["default"].settings_dict["NAME"], isolation_level=None, timeout=10
    )
    try:
        if kind == "writer":
            database.execute("BEGIN IMMEDIATE")
            database.execute("UPDATE domain_event_broker_outbox SET routing_key = routing_key")
        else:
            database.execute("BEGIN")
            database.execute("SELECT count(*) FROM domain_event_broker_outbox").fetchall()
        yield
    finally:
        database.execute("ROLLBACK")
        database.close()


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[tuple[list[subprocess.Popen[bytes]], Path]]:
    """Starts ``relay_domain_events`` (long-running); stops it after the test."""
    processes: list[subprocess.Popen[bytes]] = []
    stderr = tmp_path / "stderr"
    yield processes, stderr
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.parametrize("kind", ["writer", "reader"])
@pytest.mark.django_db(transaction=True, databases=["default"])
def test_a_long_application_transaction_does_not_make_the_relay_publish_again(
    event_queue: EventQueue,
    relay_process: tuple[list[subprocess.Popen[bytes]], Path],
    kind: str,
) -> None:
    processes, stderr_path = relay_process
    with transaction.atomic():
        uuids = [publish_via_outbox(event_queue.key(), {"n": n}).uuid_string for n in range(20)]
    with application_holding(kind), stderr_path.open("w") as stderr:
        processes.append(
            subprocess.Popen(
                manage_command("relay_domain_events", "--interval", "0.1"),
                env=relay_env_with_timeout(),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        )
        wait_for(
            lambda: "database is locked" in stderr_path.read_text(),
            timeout=HOLD * 3,
            message="the relay to meet the locked database",
        )
        # The application goes on holding it; the relay backs off and retries
        # meanwhile (and, before the fix, published the batch each time).
        threading.Event().wait(HOLD)
    wait_for(
        lambda: not OutboxEvent.objects.filter(sent_at__isnull=True).exists(),
        timeout=30,
        message="every row marked sent",
    )
    received = event_queue.take_until(20)
    processes[0].send_signal(signal.SIGTERM)
    assert processes[0].wait(timeout=30) == 0
    received += event_queue.take()
    assert sorted(b["uuid_string"] for b in received) == sorted(uuids)  # once each
    log = stderr_path.read_text()
    assert "The outbox's database 'default' failed (OperationalError: database is locked)" in log
    assert "The outbox's database 'default' answers again after" in log
    assert "Lost the connection to the broker" not in log
    assert "Reconnected to" not in log
