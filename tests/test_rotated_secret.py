"""A rotated broker secret reaches long-lived connections (issue 23, item 10).

``DOMAIN_EVENT_BROKER_FILE`` rewritten with a new password, as secret
managers do: every new connection of a running Subscriber, Publisher or
replay run (all go through :class:`Link`) reads the file again; a URL given
by the caller is kept as it is.
"""

from __future__ import annotations

import itertools
import logging
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import configure
from domain_event_broker._amqp.config import (
    ENVIRONMENT_VARIABLE,
    FILE_ENVIRONMENT_VARIABLE,
    current,
    resolve,
)
from domain_event_broker._amqp.link import Link

from .helpers import BROKER_URL

OLD = "amqp://app:old-secret@rabbit.example:5672/%2F"
NEW = "amqp://app:new-secret@rabbit.example:5672/%2F"

#: Distinct modification times for successive writes (a rotation within one
#: tick of the file system's clock would otherwise look unchanged).
_ticks = itertools.count(1_700_000_000_000_000_000, 1_000_000_000)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    tick = next(_ticks)
    os.utime(path, ns=(tick, tick))


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The broker file named by ``DOMAIN_EVENT_BROKER_FILE`` (the variable
    ``DOMAIN_EVENT_BROKER`` unset: both set is an error)."""
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    path = tmp_path / "broker-url"
    _write(path, OLD)
    monkeypatch.setenv(FILE_ENVIRONMENT_VARIABLE, str(path))
    yield path


def test_a_config_from_the_file_follows_it(secret: Path) -> None:
    config = resolve(timeout=5)
    assert config is not None and config.urls == (OLD,)
    assert current(config) is config  # unchanged: the same object
    _write(secret, f"# rotated\n{NEW}\n")
    rotated = current(config)
    assert rotated.urls == (NEW,)
    assert rotated.timeout == 5
    assert rotated == resolve(timeout=5)


def test_a_rotation_that_keeps_size_and_times_is_followed(secret: Path) -> None:
    """Found by the attack: a same-length password written with the old
    modification time (``cp -p``, ``rsync -t``, one clock tick) was never
    read by a reconnecting worker."""
    config = resolve(timeout=5)
    assert config is not None and config.urls == (OLD,)
    same_length = OLD.replace("old-secret", "odd-secret")
    before = secret.stat()
    secret.write_text(same_length)
    os.utime(secret, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert secret.stat().st_size == before.st_size
    assert current(config).urls == (same_length,)


def test_a_url_given_by_the_caller_is_kept(secret: Path) -> None:
    config = resolve(OLD)
    assert config is not None
    _write(secret, NEW)
    assert current(config) is config


def test_configure_is_followed_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delenv(FILE_ENVIRONMENT_VARIABLE, raising=False)
    configure(broker=OLD)
    config = resolve()
    assert config is not None
    configure(broker=NEW)
    assert current(config).urls == (NEW,)


@pytest.mark.parametrize(
    "text",
    ["", "# being rewritten\n", "amqp://app:pa/ss@rabbit.example/%2F", "http://x/"],
)
def test_an_unusable_file_keeps_the_previous_urls(
    secret: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A file caught half written, or wrong, does not end a running worker:
    the previous URLs are used, with a WARNING, and the next connection
    looks again."""
    config = resolve()
    assert config is not None
    _write(secret, text)
    with caplog.at_level(logging.WARNING, logger="domain_event_broker"):
        assert current(config) is config
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "previous" in warnings[0], warnings
    assert "old-secret" not in warnings[0]
    _write(secret, NEW)
    assert current(config).urls == (NEW,)


def test_a_file_removed_keeps_the_previous_urls(secret: Path) -> None:
    config = resolve()
    assert config is not None
    secret.unlink()
    assert current(config) is config


_PASSWORD = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(passwords=st.lists(_PASSWORD, min_size=1, max_size=3))
def test_each_rotation_is_followed(secret: Path, passwords: list[str]) -> None:
    """Whatever the passwords (percent-encoded in the file), each rotation is
    what the next connection uses, and never an earlier one."""
    _write(secret, OLD)
    config = resolve()
    assert config is not None
    for password in passwords:
        url = f"amqp://app:{urllib.parse.quote(password, safe='')}@rabbit.example/%2F"
        _write(secret, url)
        config = current(config)
        assert config.urls == (url,)


def test_a_link_reconnects_with_the_rotated_file(secret: Path, broker_url: str) -> None:
    """Against the broker: the link keeps its open connection, and its next
    connection reads the file again."""
    _write(secret, BROKER_URL)
    config = resolve()
    assert config is not None
    link = Link(config, "test rotated secret")
    try:
        first = link.connection if link.channel() else None
        assert first is not None
        rotated = _with_query(BROKER_URL, heartbeat="7")
        _write(secret, rotated)
        link.channel()  # still open: the running connection is kept
        assert link.connection is first
        link.drop()  # the connection is lost
        link.channel()
        assert link.config.urls == (rotated,)
        connection = link.connection
        assert connection is not None and connection is not first
    finally:
        link.drop()


def _with_query(url: str, **options: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query.update(options)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
