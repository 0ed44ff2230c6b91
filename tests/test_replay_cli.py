"""The triage commands of ``domain-event-broker`` (``inspect --summary``,
filtered ``replay`` and ``--dry-run``, ``discard``, ``export``, ``import``) and
honest counts when a replay cannot route some events, in a subprocess,
against the real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest

from domain_event_broker import DomainEvent
from domain_event_broker.replay import DeadLetter

from .conftest import Names
from .helpers import get_messages, queue_size, raw_connection, wait_for
from .replay_helpers import dead_letter_library_style, declare_handler
from .test_cli import cli


@pytest.fixture(autouse=True)
def _broker_url_in_environment(monkeypatch: pytest.MonkeyPatch, broker_url: str) -> None:
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", broker_url)


@pytest.fixture
def handler(names: Names) -> str:
    name = names.new("test-replay-cli")
    declare_handler(name)
    return name


def wait_size(queue: str, expected: int) -> None:
    wait_for(lambda: queue_size(queue) == expected, message=f"{queue} to hold {expected}")


def numbers(queue: str) -> list[int]:
    return [DomainEvent.from_json(body).data["n"] for _, _, body in get_messages(queue)]


def triage_fixture(handler: str) -> None:
    """n=0..5: KeyError on .created (0, 1, 2), Timeout on .created (3),
    KeyError on .deleted (4, 5)."""
    kinds = ["created"] * 4 + ["deleted"] * 2
    for n, kind in enumerate(kinds):
        exception = "app.errors.Timeout" if n == 3 else "builtins.KeyError"
        dead_letter_library_style(
            handler,
            DomainEvent(routing_key=f"{handler}.{kind}", data={"n": n}),
            exception=(exception, "boom"),
        )
    wait_size(f"{handler}-dl", len(kinds))


def test_inspect_summary(handler: str) -> None:
    triage_fixture(handler)

    text = cli("inspect", handler, "--summary")
    as_json = cli("inspect", handler, "--summary", "--json", "--where", "exception=KeyError")

    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{handler}-dl: 6 dead letter(s)"
    assert "  by exception:" in lines
    assert "            5  builtins.KeyError" in lines
    assert "            1  app.errors.Timeout" in lines
    assert f"            4  {handler}.created" in lines
    assert "            6  1m-10m" in lines
    summary = json.loads(as_json.stdout)
    assert (summary["total"], summary["scanned"]) == (5, 6)
    assert summary["by_routing_key"] == {f"{handler}.created": 3, f"{handler}.deleted": 2}
    assert numbers(f"{handler}-dl") == list(range(6))  # nothing removed, order kept


def test_replay_with_filters_and_dry_run(handler: str) -> None:
    triage_fixture(handler)
    where = ["--where", "exception=KeyError", "--routing-key", f"{handler}.created"]

    dry = cli("replay", handler, *where, "--dry-run")

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (
        f"{handler}: would replay 3 of 6 dead letter(s) (exception=KeyError, routing key "
        f"{handler}.created); nothing was changed"
    )
    wait_size(f"{handler}-dl", 6)
    assert queue_size(handler) == 0

    done = cli("replay", handler, *where, "--older-than", "1m")

    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{handler}: replayed 3, discarded 0, left 0, skipped 3; "
        f"3 dead letter(s) remaining in {handler}-dl\n"
    )
    wait_size(handler, 3)
    assert numbers(handler) == [0, 1, 2]
    assert numbers(f"{handler}-dl") == [3, 4, 5]


@pytest.mark.parametrize(
    "args",
    [
        ["--where", "colour=red"],
        ["--where", "exception"],
        ["--older-than", "soon"],
        ["--dry-run", "--interactive"],
    ],
)
def test_bad_filters_are_usage_errors(handler: str, args: list[str]) -> None:
    result = cli("replay", handler, *args)
    assert result.returncode == 2, result.stderr
    assert "error" in result.stderr


def test_discard_needs_filters_or_all_and_can_export_first(handler: str, tmp_path: Path) -> None:
    triage_fixture(handler)
    saved = tmp_path / "discarded.jsonl"

    refused = cli("discard", handler)
    dry = cli("discard", handler, "--routing-key", f"{handler}.deleted", "--dry-run")
    done = cli("discard", handler, "--routing-key", f"{handler}.deleted", "--export", str(saved))
    again = cli("discard", handler, "--all", "--export", str(saved))

    assert refused.returncode == 2 and "--all" in refused.stderr
    assert dry.stdout.startswith(f"{handler}: would discard 2 of 6 dead letter(s)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"{handler}: discarded 2 (saved to {saved} first), kept 4; "
        f"4 dead letter(s) remaining in {handler}-dl\n"
    )
    assert again.returncode == 2 and "exists already" in again.stderr
    assert len(saved.read_text().splitlines()) == 2
    assert numbers(f"{handler}-dl") == [0, 1, 2, 3]


def test_export_and_import_round_trip(handler: str, tmp_path: Path) -> None:
    triage_fixture(handler)
    file = tmp_path / "dl.jsonl"

    exported = cli("export", handler, str(file))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == (f"{handler}: exported 6 dead letter(s) to {file}, left in place\n")
    originals = get_messages(f"{handler}-dl")  # empties the queue
    imported = cli("import", handler, str(file))

    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == f"{handler}: imported 6 dead letter(s) into {handler}-dl\n"
    wait_size(f"{handler}-dl", 6)
    replayed = cli("replay", handler, "--all")
    assert replayed.returncode == 0, replayed.stderr
    wait_size(handler, 6)
    back = get_messages(handler)
    # The export moved them to the tail: their own routing key is in a header.
    own = [DeadLetter.from_message(m.routing_key, p, b) for m, p, b in originals]
    assert [(m.routing_key, b) for m, _, b in back] == [(d.routing_key, d.body) for d in own]
    for (_, properties, _), (_, original, _) in zip(back, originals, strict=True):
        assert properties.headers["x-exception-type"] == original.headers["x-exception-type"]
        assert properties.message_id == original.message_id


def test_import_of_a_bad_file_sends_nothing(handler: str, tmp_path: Path) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text('{"routing_key": "a", "body": ""}\n{"routing_key": 3}\n')

    result = cli("import", handler, str(file))

    assert result.returncode == 2
    assert "line 2" in result.stderr and "nothing was imported" in result.stderr
    assert queue_size(f"{handler}-dl") == 0


# -- counts when something goes wrong (issue 10) ------------------------------------------------


def unroutable_fixture(handler: str) -> None:
    """n=0, 2 routable; n=1 sent to -dl through the default exchange, so its
    routing key is the queue's name, which nothing binds."""
    dead_letter_library_style(handler, DomainEvent(routing_key=f"{handler}.x", data={"n": 0}))
    connection = raw_connection()
    connection.channel().basic_publish(
        "",
        f"{handler}-dl",
        DomainEvent(routing_key=f"{handler}.x", data={"n": 1}).to_json().encode(),
        pika.BasicProperties(delivery_mode=2),
    )
    connection.close()
    dead_letter_library_style(handler, DomainEvent(routing_key=f"{handler}.x", data={"n": 2}))
    wait_size(f"{handler}-dl", 3)


def test_replay_all_counts_unroutable_events_and_prints_the_summary(handler: str) -> None:
    unroutable_fixture(handler)

    result = cli("replay", handler, "--all")

    assert result.returncode == 1
    assert result.stdout == (
        f"{handler}: replayed 2, discarded 0, left 0, not replayable 1; "
        f"1 dead letter(s) remaining in {handler}-dl\n"
    )
    assert f"no queue is bound for routing key '{handler}-dl'" in result.stderr
    wait_size(handler, 2)
    assert numbers(handler) == [0, 2]
    assert numbers(f"{handler}-dl") == [1]


def test_interactive_says_replayed_only_when_it_was(handler: str) -> None:
    unroutable_fixture(handler)

    result = cli("replay", handler, "--all", "--interactive", input="r\nr\nr\n")

    assert result.returncode == 1
    replies = [
        line.split("? ", 1)[1] for line in result.stdout.splitlines() if line.startswith("(R)eplay")
    ]
    assert replies == [
        "Message is returned to worker queue.",
        "Message could not be returned to the worker queue (no queue is bound for its "
        "routing key); left in queue.",
        "Message is returned to worker queue.",
    ]
    assert result.stdout.splitlines()[-1] == (
        f"{handler}: replayed 2, discarded 0, left 0, not replayable 1; "
        f"1 dead letter(s) remaining in {handler}-dl"
    )


# -- progress ---------------------------------------------------------------------------


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from io import StringIO

    from domain_event_broker._cli import main as cli_module
    from domain_event_broker.replay import ReplayResult

    clock = iter(float(n) for n in range(100))
    monkeypatch.setattr(cli_module.time, "monotonic", lambda: next(clock))
    terminal, pipe = StringIO(), StringIO()
    bar = cli_module._Tracker("h", 1.0, terminal, tty=True)
    lines = cli_module._Tracker("h", 1.0, pipe, tty=False)
    for n in (1, 2, 4):
        for tracker in (bar, lines):
            tracker(ReplayResult(skipped=n), 4)
    bar.end()
    lines.end()

    assert terminal.getvalue() == (
        "\rh: [#######.......................] 1/4  25%"
        "\rh: [###############...............] 2/4  50%"
        "\rh: [##############################] 4/4 100%\n"
    )
    assert pipe.getvalue().splitlines() == [
        "h: 1/4 (replayed 0, discarded 0, left 0, skipped 1)",
        "h: 2/4 (replayed 0, discarded 0, left 0, skipped 2)",
        "h: 4/4 (replayed 0, discarded 0, left 0, skipped 4)",
    ]
    assert bar.latest == ReplayResult(skipped=4)


def test_a_filter_of_the_wrong_type_is_refused_before_connecting() -> None:
    from domain_event_broker.replay import replay_all

    with pytest.raises(TypeError, match="DeadLetterFilter"):
        replay_all("x", where={"exception": "KeyError"}, connection_settings="amqp://h:1/")  # type: ignore[arg-type]
