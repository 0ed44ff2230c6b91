"""Errors say their cause in one line (the last underlying reason and the
nodes tried) and keep pika's error chained; the command line's top level:
``--version``, ``--connect-timeout``, the sub-command's usage, strict JSON."""

from __future__ import annotations

import contextlib
import io
import math
import time
from typing import Any

import pika.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import domain_event_broker
from domain_event_broker import (
    AuthenticationError,
    BrokerUnavailableError,
    DomainEvent,
    Publisher,
    configure,
)
from domain_event_broker._amqp.config import resolve
from domain_event_broker._amqp.connect import connect
from domain_event_broker.cli import main

#: Nothing listens there: connecting is refused at once.
REFUSED_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def test_unreachable_broker_says_connection_refused_and_the_node() -> None:
    config = resolve(REFUSED_URL, timeout=0.5)
    assert config is not None
    with pytest.raises(BrokerUnavailableError) as info:
        connect(config, "test")
    message = str(info.value)
    assert "connection refused" in message
    assert "127.0.0.1:1" in message
    assert "\n" not in message
    assert "AMQPConnectorSocketConnectError" not in message
    assert isinstance(info.value.__cause__, pika.exceptions.AMQPConnectionError)


def test_each_node_gives_its_own_reason() -> None:
    config = resolve([REFUSED_URL, "amqp://guest:guest@no-such-host.invalid/%2F"], timeout=0.5)
    assert config is not None
    with pytest.raises(BrokerUnavailableError) as info:
        connect(config, "test")
    message = str(info.value)
    assert "127.0.0.1:1: connection refused" in message
    assert "no-such-host.invalid:5672: " in message
    assert not message.rstrip().endswith(":")


def test_a_failed_publish_ends_with_the_cause_not_an_empty_pika_error() -> None:
    with (
        Publisher(REFUSED_URL, timeout=0.5) as publisher,
        pytest.raises(BrokerUnavailableError) as info,
    ):
        publisher.publish_event(DomainEvent("a.b", {}))
    message = str(info.value)
    assert message.endswith("connection refused"), message
    assert "AMQPConnectionError: " not in message
    assert info.value.__cause__ is not None


def test_access_refused_says_so(broker_url: str) -> None:
    with (
        Publisher("amqp://guest:wrong-pw@127.0.0.1:5672/%2F") as publisher,
        pytest.raises(AuthenticationError) as info,
    ):
        publisher.connect()
    assert "access refused" in str(info.value)
    assert "wrong-pw" not in str(info.value)


# -- the command line ---------------------------------------------------------------------------


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr("sys.stdin", io.StringIO(stdin))
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_version() -> None:
    status, out, _ = run("--version")
    assert status == 0
    assert out.strip() == f"domain-event-broker {domain_event_broker.__version__}"


def test_connect_timeout_shortens_the_wait_and_names_the_cause() -> None:
    started = time.monotonic()
    status, _, err = run("--url", REFUSED_URL, "--connect-timeout", "1", "publish", "a.b", "{}")
    assert time.monotonic() - started < 20  # the default is 30 s
    assert status == 1
    assert "connection refused" in err
    assert "Traceback" not in err


def test_connect_timeout_after_the_command_and_its_default_restored() -> None:
    status, _, err = run("publish", "--url", REFUSED_URL, "--connect-timeout", "0.5", "a.b", "{}")
    assert status == 1
    assert "within 0.5s" in err
    assert resolve(REFUSED_URL) is not None
    assert resolve(REFUSED_URL).timeout == 30.0  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_connect_timeout_is_a_clear_usage_error(value: str) -> None:
    status, _, err = run("--connect-timeout", value, "publish", "a.b", "{}")
    assert status == 2
    assert "--connect-timeout" in err
    assert "positive number of seconds" in err or "not a number" in err
    assert "_timeout" not in err


@pytest.mark.parametrize("data", ["NaN", "[Infinity]", '{"x": -Infinity}'])
def test_publish_refuses_non_standard_json(data: str) -> None:
    status, _, err = run("--url", REFUSED_URL, "publish", "a.b", data)
    assert status == 2
    assert "not JSON (RFC 8259)" in err


def test_errors_after_parsing_show_the_commands_usage() -> None:
    status, _, err = run("--url", "amqp:guest:S3cret@localhost:5672/%2F", "publish", "a.b", "{}")
    assert status == 2
    assert err.startswith("usage: domain-event-broker publish ")
    assert "'//' is missing after 'amqp:'" in err
    assert "S3cret" not in err


# -- property: whatever the arguments, a status and no traceback --------------------------------

words = st.sampled_from(
    [
        "publish",
        "replay",
        "inspect",
        "status",
        "--url",
        REFUSED_URL,
        "amqp:guest:pw@h",
        "--connect-timeout",
        "0.2",
        "0",
        "-1",
        "nan",
        "inf",
        "1e309",
        "--verbose",
        "--limit",
        "--timeout",
        "--progress-interval",
        "--delay",
        "--json",
        "--all",
        "--interactive",
        "--domain-object-id",
        "--help",
        "a.b",
        "amq.x",
        "k" * 300,
        "NaN",
        "{}",
        '{"a": Infinity}',
        "[" * 2000,
        "-",
        "",
    ]
)
argvs = st.lists(words | st.text(max_size=12), max_size=8)


@settings(max_examples=200, deadline=None)
@given(argv=argvs, stdin=st.sampled_from(["", "{}", "NaN", "[" * 5000, "not json"]))
def test_command_line_arguments(argv: list[str], stdin: str) -> None:
    # Never the real broker: an unreachable one, with a short deadline.
    full = ["--url", REFUSED_URL, "--connect-timeout", "0.2", *argv]
    status, _, err = run(*full, stdin=stdin)
    assert status in (0, 1, 2)
    assert "Traceback" not in err or "--verbose" in argv
    if status == 2 and "--help" not in argv:
        assert "usage: domain-event-broker" in err


@settings(max_examples=50, deadline=None)
@given(
    value=st.floats() | st.integers(min_value=-(2**1100), max_value=2**1100) | st.text(max_size=4)
)
def test_configure_timeout(value: Any) -> None:
    try:
        configure(timeout=value)
    except ValueError:
        return
    assert isinstance(value, (int, float)) and value > 0 and math.isfinite(value)
