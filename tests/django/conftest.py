"""Django for the tests in this directory only: SQLite, and PostgreSQL when
it answers (in CI it must), each test run once per database.

Settings are configured here, at collection time, so that pytest-django stays
inactive for the rest of the suite.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings
from django.db import connections

from ..helpers import raw_connection
from . import settings as test_settings
from .support import REPO_ROOT, EventQueue, LimitedQueue

#: The PostgreSQL server of the test machine; DEB_TEST_PG_PORT moves it (e.g. to
#: check that its tests skip when it is down).
PG_HOST = "127.0.0.1"
PG_PORT = os.environ.get("DEB_TEST_PG_PORT", "5432")
PG_DSN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=test connect_timeout=3"
RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
SQLITE_TEST_FILE = Path(tempfile.gettempdir()) / f"deb_django_test_{RUN_ID}.sqlite3"


def _postgres_answers() -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    try:
        psycopg.connect(PG_DSN).close()
    except psycopg.Error:
        return False
    return True


POSTGRES_ANSWERS = _postgres_answers()

DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(SQLITE_TEST_FILE),
        # A file, not memory: relay subprocesses must see the same database.
        "TEST": {"NAME": str(SQLITE_TEST_FILE)},
    },
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "test",
        "USER": "postgres",
        "HOST": PG_HOST,
        "PORT": PG_PORT,
        # Unique: other engineers run tests against the same server.
        "TEST": {"NAME": f"test_deb_django_{RUN_ID}"},
    },
}

if not settings.configured:
    values = {name: getattr(test_settings, name) for name in dir(test_settings) if name.isupper()}
    values.pop("LOGGING")  # pytest captures logs itself
    values["DATABASES"] = DATABASES
    settings.configure(**values)
django.setup()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that takes ``db_alias`` on SQLite and on PostgreSQL."""
    if "db_alias" not in metafunc.fixturenames:
        return
    postgres_marks: list[pytest.MarkDecorator] = [
        pytest.mark.django_db(transaction=True, databases=["postgres"])
    ]
    if not POSTGRES_ANSWERS and not os.environ.get("CI"):
        # No django_db mark: pytest-django would try to create the database.
        postgres_marks = [pytest.mark.skip(reason=f"no PostgreSQL answers at {PG_HOST}:{PG_PORT}")]
    metafunc.parametrize(
        "db_alias",
        [
            pytest.param(
                "default",
                marks=pytest.mark.django_db(transaction=True, databases=["default"]),
                id="sqlite",
            ),
            pytest.param("postgres", marks=postgres_marks, id="postgres"),
        ],
    )


@pytest.fixture
def db_alias(request: pytest.FixtureRequest) -> str:
    """The database alias of this run of the test (see pytest_generate_tests)."""
    alias: str = request.param
    return alias


@pytest.fixture
def event_queue(broker_url: str) -> Iterator[EventQueue]:
    """A fresh queue receiving the routing keys ``<unique prefix>.*``; deleted after."""
    suffix = uuid.uuid4().hex[:10]
    queue = EventQueue(f"test-django-{suffix}", f"djangotest{suffix}")
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.exchange_declare("domain-events", exchange_type="topic", durable=True)
        channel.queue_declare(queue.name, durable=True)
        channel.queue_bind(queue.name, "domain-events", routing_key=f"{queue.prefix}.#")
    finally:
        connection.close()
    yield queue
    connection = raw_connection()
    try:
        connection.channel().queue_delete(queue.name)
    finally:
        connection.close()


@pytest.fixture
def limited_queue(broker_url: str) -> Iterator[LimitedQueue]:
    """A queue of at most 3 messages, refusing more, receiving ``<unique prefix>.*``."""
    suffix = uuid.uuid4().hex[:10]
    queue = LimitedQueue(f"test-django-limited-{suffix}", f"djangolimited{suffix}", 3)
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.exchange_declare("domain-events", exchange_type="topic", durable=True)
        channel.queue_declare(
            queue.name,
            durable=True,
            arguments={"x-max-length": queue.max_length, "x-overflow": "reject-publish"},
        )
        channel.queue_bind(queue.name, "domain-events", routing_key=f"{queue.prefix}.#")
    finally:
        connection.close()
    yield queue
    connection = raw_connection()
    try:
        connection.channel().queue_delete(queue.name)
    finally:
        connection.close()


@pytest.fixture
def relay_env(db_alias: str) -> dict[str, str]:
    """Environment for a ``manage.py`` subprocess using this test's databases."""
    databases = {
        alias: {**DATABASES[alias], "NAME": connections[alias].settings_dict["NAME"]}
        for alias in ("default", db_alias)
    }
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.django.settings",
        "DEB_TEST_DATABASES": json.dumps(databases),
        "PYTHONPATH": str(REPO_ROOT),
    }
