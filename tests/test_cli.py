"""The ``domain-event-broker`` command-line tool, run through its real entry
point in a subprocess, against the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from domain_event_broker import DomainEvent
from domain_event_broker._amqp.config import redact

from .conftest import Names
from .helpers import BROKER_URL, get_messages, queue_exists, queue_size, raw_connection, wait_for
from .replay_helpers import (
    dead_letter_302_style,
    dead_letter_library_style,
    declare_handler,
    make_event,
)

SCRIPT = Path(sys.executable).with_name("domain-event-broker")
WRONG_PASSWORD_URL = "amqp://guest:sekrit-pw@127.0.0.1:5672/%2F"


def command(*args: str, module: bool = False) -> list[str]:
    if module or not SCRIPT.exists():
        return [sys.executable, "-m", "domain_event_broker", *args]
    return [str(SCRIPT), *args]


def cli(
    *args: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    module: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args, module=module),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def env(broker_url: str) -> dict[str, str]:
    return {**os.environ, "DOMAIN_EVENT_BROKER": broker_url}


@pytest.fixture(autouse=True)
def _broker_url_in_environment(monkeypatch: pytest.MonkeyPatch, broker_url: str) -> None:
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", broker_url)


@pytest.fixture
def handler(names: Names) -> str:
    name = names.new("test-cli")
    declare_handler(name)
    return name


Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start the tool with pipes; kill it at the end if a test left it running."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            command(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        process.wait(timeout=30)


def finish(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    """Close stdin, and read everything until the tool exits."""
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    if not process.stdin.closed:
        process.stdin.close()
    out = process.stdout.read()
    err = process.stderr.read()
    process.wait(timeout=30)
    return out.decode(), err.decode()


def fill(handler: str, count: int) -> list[DomainEvent]:
    events = [
        dead_letter_library_style(handler, make_event(handler, {"n": n})) for n in range(count)
    ]
    wait_size(f"{handler}-dl", count)
    return events


def wait_size(queue: str, expected: int) -> None:
    wait_for(lambda: queue_size(queue) == expected, message=f"{queue} to hold {expected}")


def data_of(queue: str) -> list[object]:
    return [DomainEvent.from_json(body).data for _, _, body in get_messages(queue)]


# -- usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["replay"],
        ["replay", "x", "--limit", "0"],
        ["replay", "x", "--timeout", "soon"],
        ["inspect", "x", "--limit", "-1"],
        ["status", "x", "--delay", "nan"],
        ["--url", "http://localhost", "status", "x"],
        ["status", "x", "--url", "amqp://host:notaport/"],
    ],
)
def test_wrong_usage_exits_2(args: Sequence[str]) -> None:
    result = cli(*args)

    assert result.returncode == 2, result
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_help() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for name in ("publish", "replay", "inspect", "status", "--url", "--verbose"):
        assert name in result.stdout
    assert "--interactive" in cli("replay", "--help").stdout


def test_module_entry_point(handler: str) -> None:
    fill(handler, 1)

    result = cli("status", handler, module=True)

    assert result.returncode == 0, result.stderr
    assert f"{handler}-dl" in result.stdout


# -- publish -----------------------------------------------------------------------


def test_publish_from_argument_and_standard_input(names: Names) -> None:
    name = names.new("test-cli")
    connection = raw_connection()
    channel = connection.channel()
    channel.exchange_declare("domain-events", exchange_type="topic", durable=True)
    channel.queue_declare(name, durable=True)
    channel.queue_bind(name, "domain-events", f"{name}.*")
    connection.close()

    first = cli("publish", f"{name}.created", '{"id": 1, "tags": ["a"]}', "--domain-object-id", "7")
    second = cli("publish", f"{name}.updated", input='{"id": 2}\n')
    third = cli("publish", f"{name}.deleted", "-", input="[3]")

    for result in (first, second, third):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("published ")
    wait_size(name, 3)
    messages = get_messages(name)
    events = [DomainEvent.from_json(body) for _, _, body in messages]
    assert [(e.routing_key, e.data) for e in events] == [
        (f"{name}.created", {"id": 1, "tags": ["a"]}),
        (f"{name}.updated", {"id": 2}),
        (f"{name}.deleted", [3]),
    ]
    assert events[0].domain_object_id == "7"
    assert first.stdout.split() == ["published", f"{name}.created", events[0].uuid_string]
    assert messages[0][1].delivery_mode == 2


@pytest.mark.parametrize(
    ("args", "stdin"), [(["k.x", "{oops"], ""), (["k.x"], "not json"), ([""], "")]
)
def test_publish_bad_input_exits_2(args: list[str], stdin: str) -> None:
    result = cli("publish", *args, input=stdin or "{}")

    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines()[-1].startswith("domain-event-broker: error:")


# -- inspect ---------------------------------------------------------------------------


def test_inspect_shows_dead_letters_and_leaves_them(handler: str) -> None:
    events = fill(handler, 2)
    old = dead_letter_302_style(handler, make_event(handler, {"n": "old"}))
    wait_size(f"{handler}-dl", 3)

    text = cli("inspect", handler)
    limited = cli("inspect", handler, "--limit", "1", "--json")

    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{handler}-dl: 3 dead letter(s), showing the oldest 3"
    assert lines[1].startswith(f"1. {handler}.happened  uuid {events[0].uuid_string}  age 1m3")
    assert lines[1].endswith("retries 2")
    assert lines[2] == "   failed: app.errors.PaymentFailed: card declined (in app.handlers.charge)"
    assert lines[3] == '   data: {"n": 0}'
    assert lines[7].startswith(f"3. {handler}.happened  uuid {old.uuid_string}  age ")
    assert lines[8] == f"   failed: rejected by queue {handler} (no exception recorded)"
    assert limited.returncode == 0, limited.stderr
    (shown,) = json.loads(limited.stdout)
    assert shown["uuid_string"] == events[0].uuid_string
    assert shown["exception_type"] == "app.errors.PaymentFailed"
    assert shown["retry_count"] == 2
    assert shown["exception_traceback"].startswith("Traceback (most recent call last):")
    assert shown["event"]["data"] == {"n": 0}
    assert 80 < shown["age_seconds"] < 300
    wait_size(f"{handler}-dl", 3)
    assert queue_size(handler) == 0


def test_inspect_empty_queue(handler: str) -> None:
    result = cli("inspect", handler)
    assert (result.returncode, result.stdout) == (0, f"{handler}-dl: no dead letters\n")


# -- status --------------------------------------------------------------------------------


def test_status(handler: str) -> None:
    fill(handler, 2)
    connection = raw_connection()
    channel = connection.channel()
    channel.queue_declare(
        f"{handler}-delay-60000",
        durable=True,
        arguments={"x-message-ttl": 60000, "x-dead-letter-exchange": f"{handler}-retry"},
    )
    channel.basic_publish("", f"{handler}-delay-60000", b"{}")
    channel.basic_consume(handler, lambda *args: None)
    try:
        text = cli("status", handler, "--delay", "60")
        as_json = cli("status", handler, "--json", "--delay", "60")
    finally:
        channel.queue_delete(f"{handler}-delay-60000")
        connection.close()

    assert text.returncode == 0, text.stderr
    lines = [line.split() for line in text.stdout.splitlines()]
    assert lines == [
        ["queue", handler, "0", "message(s)", "1", "consumer(s)"],
        ["dead", "letters", f"{handler}-dl", "2", "message(s)"],
        ["delayed", "retries", f"{handler}-delay-60000", "1", "message(s)"],
        ["retry", "exchange", f"{handler}-retry", "exists"],
        ["dead-letter", "exchange", f"{handler}-dlx", "exists"],
        ["connection", BROKER_URL.split("@")[-1].split("/")[0], "plain", "AMQP", "(no", "TLS)"],
    ]
    status = json.loads(as_json.stdout)
    assert status["queue"] == {"name": handler, "exists": True, "messages": 0, "consumers": 1}
    assert status["dead_letter_queue"]["messages"] == 2
    assert [q["name"] for q in status["delay_queues"]] == [f"{handler}-delay-60000"]


def test_status_of_a_handler_without_dead_letters(names: Names) -> None:
    name = names.new("test-cli")
    declare_handler(name, dead_letter=False)

    result = cli("status", name)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split() == ["dead", "letters", f"{name}-dl", "(none)"]
    assert not queue_exists(f"{name}-dl")


def test_status_of_an_unknown_handler_is_an_error(names: Names) -> None:
    name = names.new("test-cli")

    result = cli("status", name)

    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"domain-event-broker: error: no handler named {name!r}: its queue does not exist"
    )
    assert not queue_exists(name)


# -- replay ----------------------------------------------------------------------------------


def test_replay_one_by_default(handler: str) -> None:
    fill(handler, 3)

    result = cli("replay", handler)

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{handler}: replayed 1, discarded 0, left 0; 2 dead letter(s) remaining in {handler}-dl\n"
    )
    wait_size(handler, 1)
    assert data_of(handler) == [{"n": 0}]


def test_replay_all_and_limit_with_progress(handler: str) -> None:
    fill(handler, 5)

    limited = cli("replay", handler, "--limit", "2", "--progress-interval", "0")
    everything = cli("replay", handler, "--all", "--url", os.environ["DOMAIN_EVENT_BROKER"])

    assert limited.returncode == 0, limited.stderr
    assert limited.stdout.startswith(f"{handler}: replayed 2, discarded 0, left 0; 3 dead")
    assert limited.stderr.splitlines() == [
        f"{handler}: 1/2 (replayed 1, discarded 0, left 0)",
        f"{handler}: 2/2 (replayed 2, discarded 0, left 0)",
    ]
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.startswith(f"{handler}: replayed 3, discarded 0, left 0; 0 dead")
    assert everything.stderr == ""  # a short run: no progress lines
    wait_size(handler, 5)
    assert data_of(handler) == [{"n": n} for n in range(5)]


def test_replay_interactive_with_piped_answers(handler: str) -> None:
    events = fill(handler, 4)

    result = cli("replay", handler, "--all", "--interactive", input="R\ndiscard\nl\n")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("Please specify action for:") == 4
    assert json.dumps(events[0].event_data, indent=4, sort_keys=True) in out
    assert out.count("Failed: app.errors.PaymentFailed: card declined (after 2 retries") == 4
    replies = [line.split("? ", 1)[1] for line in out.splitlines() if line.startswith("(R)eplay")]
    assert replies == [
        "Message is returned to worker queue.",
        "Message has been discarded.",
        "Message left in queue.",
        "Message left in queue.",  # end of input
    ]
    assert out.splitlines()[-1] == (
        f"{handler}: replayed 1, discarded 1, left 2; 2 dead letter(s) remaining in {handler}-dl"
    )
    wait_size(handler, 1)
    wait_size(f"{handler}-dl", 2)
    assert data_of(f"{handler}-dl") == [{"n": 2}, {"n": 3}]


def test_replay_interactive_stops_showing_events_at_the_end_of_input(handler: str) -> None:
    fill(handler, 6)

    result = cli("replay", handler, "--all", "--interactive", input="d\n")

    assert result.returncode == 0, result.stderr
    # The first is discarded, the second meets the end of the input; the
    # other four are left without being printed.
    assert result.stdout.count("Please specify action for:") == 2
    assert result.stdout.splitlines()[-1] == (
        f"{handler}: replayed 0, discarded 1, left 5; 5 dead letter(s) remaining in {handler}-dl"
    )
    wait_size(f"{handler}-dl", 5)


def test_replay_interactive_without_answer_times_out(handler: str, spawn: Spawn) -> None:
    fill(handler, 1)
    process = spawn("replay", handler, "--interactive", "--timeout", "1")
    assert process.stdout is not None
    started = time.monotonic()
    out = process.stdout.read().decode()  # until the tool exits; its stdin stays open
    elapsed = time.monotonic() - started
    _, err = finish(process)

    assert process.returncode == 0, err
    assert elapsed < 15
    assert "(R)eplay, (D)iscard or (L)eave? Timed out. Message left in queue." in out
    assert "left 1; 1 dead letter(s) remaining" in out
    wait_size(f"{handler}-dl", 1)
    assert queue_size(handler) == 0


def _read_until(process: subprocess.Popen[bytes], marker: bytes, timeout: float = 30) -> bytes:
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        chunk = os.read(process.stdout.fileno(), 4096)
        assert chunk, f"output ended before {marker!r}: {seen!r}"
        seen += chunk
    return seen


@pytest.mark.slow
def test_a_slow_answer_keeps_the_connection_alive(
    handler: str, broker_url: str, spawn: Spawn
) -> None:
    """With 2 s heartbeats the broker drops a connection silent for ~4 s: the
    prompt must service it while waiting 7 s for the answer."""
    fill(handler, 1)
    process = spawn(
        "replay", handler, "--interactive", "--timeout", "20", "--url", f"{broker_url}?heartbeat=2"
    )
    assert process.stdin is not None
    _read_until(process, b"(L)eave? ")
    time.sleep(7)  # the operator thinks it over
    process.stdin.write(b"r\n")
    out, err = finish(process)

    assert process.returncode == 0, err
    assert "Message is returned to worker queue." in out
    wait_size(handler, 1)
    assert queue_size(f"{handler}-dl") == 0


def test_interrupt_leaves_events_in_place(handler: str, spawn: Spawn) -> None:
    fill(handler, 2)
    process = spawn("replay", handler, "--all", "--interactive")
    assert process.stdin is not None
    _read_until(process, b"(L)eave? ")
    process.stdin.write(b"l\n")
    process.stdin.flush()
    _read_until(process, b"(L)eave? ")  # the second event
    process.send_signal(signal.SIGINT)
    _, err = finish(process)

    assert process.returncode == 130
    assert "interrupted" in err
    assert "Traceback" not in err
    wait_size(f"{handler}-dl", 2)
    # The event left moved to the tail at once (4.1: nothing is held); the
    # unanswered one is back at the head.
    assert data_of(f"{handler}-dl") == [{"n": 1}, {"n": 0}]


# -- errors ------------------------------------------------------------------------------------


def test_missing_dead_letter_queue_is_one_line(names: Names) -> None:
    name = names.new("test-cli")

    for args in (["replay", name, "--all"], ["inspect", name]):
        result = cli(*args)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"domain-event-broker: error: handler {name!r} has no dead-letter queue "
            f"'{name}-dl' on {redact(BROKER_URL)} (was it registered with "
            "dead_letter=True?)",
            "domain-event-broker: (run with --verbose for details)",
        ]
    assert not queue_exists(f"{name}-dl")


def test_errors_never_show_the_password(handler: str, env: dict[str, str]) -> None:
    plain = cli("--url", WRONG_PASSWORD_URL, "replay", handler)
    verbose = cli(
        "replay", handler, "--verbose", env={**env, "DOMAIN_EVENT_BROKER": WRONG_PASSWORD_URL}
    )

    assert plain.returncode == 1
    assert plain.stderr.splitlines()[0].startswith(
        "domain-event-broker: error: the broker at amqp://guest:***@127.0.0.1:5672/%2F refused"
    )
    assert "Traceback" not in plain.stderr
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr
    assert "ProbableAuthenticationError" in verbose.stderr
    for result in (plain, verbose):
        assert "sekrit" not in result.stderr + result.stdout


def test_url_option_wins_over_the_environment(handler: str, env: dict[str, str]) -> None:
    fill(handler, 1)

    result = cli(
        "status",
        handler,
        "--url",
        env["DOMAIN_EVENT_BROKER"],
        env={**env, "DOMAIN_EVENT_BROKER": WRONG_PASSWORD_URL},
    )

    assert result.returncode == 0, result.stderr


def test_replay_of_an_empty_queue(handler: str) -> None:
    result = cli("replay", handler, "--all")

    assert (result.returncode, result.stdout) == (
        0,
        f"{handler}: replayed 0, discarded 0, left 0; 0 dead letter(s) remaining in {handler}-dl\n",
    )
