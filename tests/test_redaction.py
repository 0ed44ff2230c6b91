"""No error, log record or repr shows a password, whatever the URL looks like;
and the advice for a malformed URL names the real mistake."""

from __future__ import annotations

import contextlib
import io
import logging
import traceback
import urllib.parse
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from domain_event_broker import (
    ConfigurationError,
    DomainEventBrokerError,
    Publisher,
    Subscriber,
    configure,
    publish_domain_event,
)
from domain_event_broker._amqp.config import redact, resolve
from domain_event_broker.cli import main

SECRET = "S3cretPw"


@pytest.mark.parametrize(
    ("url", "advice"),
    [
        (f"amqp:guest:{SECRET}@localhost:5672/%2F", "'//' is missing after 'amqp:'"),
        (f"amqps:guest:{SECRET}@localhost/%2F", "'//' is missing after 'amqps:'"),
        (f"amqp:/guest:{SECRET}@localhost/%2F", "two slashes"),
        (f"amqp//guest:{SECRET}@h", "':' is missing between 'amqp' and '//'"),
        (f"guest:{SECRET}@host", "must start with amqp:// or amqps://"),
        (f"//guest:{SECRET}@host", "must start with amqp:// or amqps://"),
        (f"amqp://guest:{SECRET}", "the port must be a number"),
        (f"amqp://guest:{SECRET}/x", "the port must be a number"),
        (f"amqp://u:p@ss/{SECRET}@host/", "must be percent-encoded"),
        (f"amqp://u:{SECRET}@host/v@host", "must be percent-encoded"),
        (f"ftp://u:{SECRET}@host/", "the scheme must be amqp:// or amqps://"),
    ],
)
def test_malformed_urls_name_the_mistake_and_hide_the_password(url: str, advice: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        resolve(url)
    message = str(info.value)
    assert advice in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)
    assert SECRET not in redact(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"amqp:guest:{SECRET}@localhost:5672/%2F", "amqp:***@localhost:5672/%2F"),
        (f"amqp//guest:{SECRET}@h", "amqp//***@h"),
        (f"guest:{SECRET}@host", "guest:***@host"),
        (f"amqp://guest:{SECRET}", "amqp://guest:***"),
        ("amqp://guest@host:5672/", "amqp://guest@host:5672/"),
        ("amqp://[::1]:5672/", "amqp://[::1]:5672/"),
    ],
)
def test_redact_does_not_need_a_well_formed_url(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_django_improperly_configured_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("django")
    from django.core.exceptions import ImproperlyConfigured

    from domain_event_broker.django import apps

    monkeypatch.setattr(
        apps, "settings", type("Settings", (), {"DOMAIN_EVENT_BROKER": f"amqp:u:{SECRET}@h/"})
    )
    config = object.__new__(apps.DomainEventsConfig)
    with pytest.raises(ImproperlyConfigured) as info:
        config.ready()
    assert "'//' is missing" in str(info.value)
    assert SECRET not in "".join(traceback.format_exception(info.value))


# -- property: a generated password never shows ------------------------------------------------

# Specials included on purpose: unescaped they make the URL malformed.
passwords = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
    | st.sampled_from("/?#@:%, "),
    min_size=4,
    max_size=16,
).map(lambda text: f"Pw{text}Zz")
plain_passwords = st.text(
    alphabet=st.characters(min_codepoint=48, max_codepoint=122), min_size=4, max_size=12
).map(lambda text: f"Pw{text}Zz")
users = st.sampled_from(["guest", "u", ""])


def templates(user: str, password: str) -> list[str]:
    quoted = urllib.parse.quote(password, safe="")
    return [
        f"amqp://{user}:{password}@127.0.0.1:5672/%2F",
        f"amqp://{user}:{quoted}@127.0.0.1:5672/%2F",
        f"amqp:{user}:{password}@localhost:5672/%2F",
        f"amqp//{user}:{password}@127.0.0.1",
        f"{user}:{password}@127.0.0.1",
        f"amqp://{user}:{quoted}@127.0.0.1:5672/%2F?heartbeat=often",
        f"amqp://{user}:{quoted}@127.0.0.1:5672/%2F?no_such_option=1",
        f"amqps://{user}:{password}@[::1/",
        f"amqp://{user}:{quoted}@127.0.0.1:notaport/",
    ]


def forms(password: str) -> set[str]:
    """The password as given, and as it would read after decoding."""
    return {password, urllib.parse.unquote(password)}


def assert_hidden(password: str, *texts: str) -> None:
    for text in texts:
        for form in forms(password):
            assert form not in text


def records_text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(message)s")
    return "\n".join(formatter.format(record) for record in records)


def outcome(call: Any) -> str:
    """Everything a call shows: its result's repr, or its error's text and chain."""
    try:
        result = call()
    except (TypeError, ValueError, DomainEventBrokerError) as exc:
        return "".join(traceback.format_exception(exc)) + repr(exc)
    return repr(result)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(user=users, password=passwords, which=st.integers(0, 8))
@example(user="guest", password="PwS3cr/etZz", which=0)
@example(user="guest", password="PwS3cr@etZz", which=0)
@example(user="guest", password="PwS3cr etZz", which=0)
@example(user="guest", password="PwS3cr,etZz", which=0)
@example(user="guest", password="PwS3cretZz", which=2)
@example(user="guest", password="Pw://S3cretZz", which=4)  # no scheme, "://" in the password
@example(user="guest", password="Pw:S3cretZz", which=7)
def test_no_generated_password_in_errors_logs_or_reprs(
    broker_url: str, caplog: pytest.LogCaptureFixture, user: str, password: str, which: int
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    url = templates(user, password)[which]
    shown = [
        redact(url),
        outcome(lambda: resolve(url, timeout=2)),
        outcome(lambda: configure(broker=url)),
        outcome(lambda: Subscriber(url)),
        outcome(lambda: publish_domain_event("edges.nobody", {}, connection_settings=url)),
    ]
    try:
        publisher = Publisher(url, timeout=2)
    except (TypeError, ValueError, DomainEventBrokerError):
        pass
    else:
        with publisher:
            shown += [repr(publisher), str(publisher.connection_settings)]
            shown.append(outcome(lambda: publisher.publish_event(publisher_event())))
    shown.append(records_text(caplog.records))
    assert_hidden(password, *shown)


def publisher_event() -> Any:
    from domain_event_broker import DomainEvent

    return DomainEvent("edges.nobody", {})


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    user=users,
    password=passwords,
    which=st.integers(0, 8),
    command=st.sampled_from(
        [
            ["publish", "edges.nobody", "{}"],
            ["status", "edges-nobody"],
            ["inspect", "edges-nobody"],
            ["replay", "edges-nobody"],
        ]
    ),
    verbose=st.booleans(),
)
@example(
    user="guest",
    password="PwS3cretZz",
    which=2,
    command=["publish", "edges.nobody", "{}"],
    verbose=False,
)
@example(user="guest", password="PwS3cretZz", which=0, command=["status", "x"], verbose=True)
def test_no_generated_password_on_the_command_line(
    broker_url: str,
    caplog: pytest.LogCaptureFixture,
    user: str,
    password: str,
    which: int,
    command: list[str],
    verbose: bool,
) -> None:
    caplog.clear()
    url = templates(user, password)[which]
    out, err = io.StringIO(), io.StringIO()
    argv = ["--url", url, "--connect-timeout", "2", *command] + (["--verbose"] if verbose else [])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    assert status in (0, 1, 2)
    assert_hidden(password, out.getvalue(), err.getvalue(), records_text(caplog.records))
    assert "Traceback" not in err.getvalue() or verbose


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60), password=plain_passwords)
def test_redact_hides_whatever_precedes_the_last_at(text: str, password: str) -> None:
    url = f"{text}:{password}@{text.replace('@', '')}"
    assert password not in redact(url)
