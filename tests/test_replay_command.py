"""The Django management command ``replay_domain_event``, against the real broker.

Its input is faked as in 3.0.2's own tests: ``sys.stdin`` replaced by a
``StringIO`` and ``select.select`` by a function answering at once.
"""

from __future__ import annotations

import os
from io import StringIO
from typing import Any

import pytest

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402  # after importorskip
from django.core.management import CommandError, call_command  # noqa: E402

from domain_event_broker import DomainEvent  # noqa: E402
from domain_event_broker._deadletters import run as rotation  # noqa: E402

from . import replay_django_settings  # noqa: E402
from .conftest import Names  # noqa: E402
from .helpers import get_messages, queue_exists, queue_size, wait_for  # noqa: E402
from .replay_helpers import dead_letter_library_style, declare_handler, make_event  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _django() -> None:
    """Set Django up at test time, not at import time, so that settings
    configured by other test packages (collected first) are left alone."""
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        settings.configure(
            **{
                key: getattr(replay_django_settings, key)
                for key in dir(replay_django_settings)
                if key.isupper()
            }
        )
    django.setup()


@pytest.fixture
def handler(names: Names) -> str:
    name = names.new("test-replay")
    declare_handler(name)
    return name


@pytest.fixture
def dead_letter(handler: str) -> DomainEvent:
    event = dead_letter_library_style(handler)
    wait_size(f"{handler}-dl", 1)
    return event


def wait_size(queue: str, expected: int) -> None:
    wait_for(lambda: queue_size(queue) == expected, message=f"{queue} to hold {expected}")


def answer(monkeypatch: pytest.MonkeyPatch, text: str | None) -> None:
    """Fake the operator's answer: ``None`` never answers."""
    monkeypatch.setattr("sys.stdin", StringIO(text or ""))
    if text is None:
        monkeypatch.setattr("select.select", lambda x, y, z, *args: ([], [], []))
    else:
        monkeypatch.setattr("select.select", lambda x, y, z, *args: (x, y, z))


def run(*args: str) -> list[str]:
    output = StringIO()
    call_command("replay_domain_event", *args, stdout=output)
    return output.getvalue().split("\n")


def test_replay(handler: str, dead_letter: DomainEvent) -> None:
    assert run(handler) == [f"0 dead-lettered events remaining for {handler}", ""]

    wait_size(handler, 1)
    assert queue_size(f"{handler}-dl") == 0
    ((_, properties, body),) = get_messages(handler)
    assert DomainEvent.from_json(body) == dead_letter
    assert properties.delivery_mode == 2


def test_interactive_replay(
    handler: str, dead_letter: DomainEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer(monkeypatch, "Replay")

    lines = run(handler, "--interactive")

    wait_size(handler, 1)
    assert queue_size(f"{handler}-dl") == 0
    # 3.0.2's output, line for line.
    assert lines[:3] == ["Please specify action for:", "{", '    "data": {']
    pretty = "\n".join(lines[1 : lines.index("}") + 1])
    assert pretty.splitlines() == [
        "{",
        '    "data": {',
        '        "n": 0',
        "    },",
        '    "domain_object_id": null,',
        f'    "routing_key": "{dead_letter.routing_key}",',
        f'    "timestamp": {dead_letter.timestamp},',
        f'    "uuid_string": "{dead_letter.uuid_string}"',
        "}",
    ]
    assert lines[lines.index("}") + 1 :] == [
        "(R)eplay, (D)iscard or (L)eave? Message is returned to worker queue.",
        f"0 dead-lettered events remaining for {handler}",
        "",
    ]


@pytest.mark.parametrize(
    "case",
    [
        ("Leave", "Message left in queue.", 1),
        ("Discard", "Message has been discarded.", 0),
        ("d", "Message has been discarded.", 0),
        ("Obliterate", "Message left in queue.", 1),
        ("don't", "Message left in queue.", 1),  # asked again, then the input ends
        ("dunno\nd", "Message has been discarded.", 0),
        ("", "Message left in queue.", 1),
        (None, "Timed out. Message left in queue.", 1),
    ],
)
def test_interactive_answers(
    handler: str,
    dead_letter: DomainEvent,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str | None, str, int],
) -> None:
    text, reply, left = case
    answer(monkeypatch, text)

    lines = run(handler, "--interactive")

    assert lines[-3:] == [
        f"(R)eplay, (D)iscard or (L)eave? {reply}",
        f"0 dead-lettered events remaining for {handler}",
        "",
    ]
    wait_size(f"{handler}-dl", left)
    assert queue_size(handler) == 0


def test_an_unknown_answer_is_asked_again(
    handler: str, dead_letter: DomainEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer(monkeypatch, "don't\ndunno\nl\n")

    lines = run(handler, "--interactive")

    question = "(R)eplay, (D)iscard or (L)eave? "
    assert lines[-5:-2] == [
        f'{question}Unknown answer "don\'t": answer r (replay), d (discard) or l (leave); '
        "an empty answer leaves it.",
        f"{question}Unknown answer 'dunno': answer r (replay), d (discard) or l (leave); "
        "an empty answer leaves it.",
        f"{question}Message left in queue.",
    ]
    wait_size(f"{handler}-dl", 1)


def test_ctrl_c_at_the_prompt_is_one_line_and_a_nonzero_exit(
    handler: str, dead_letter: DomainEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", StringIO(""))
    monkeypatch.setattr("select.select", interrupted)

    with pytest.raises(CommandError, match=r"^interrupted; unanswered events stay") as info:
        run(handler, "--interactive")

    assert info.value.returncode == 130
    assert queue_size(f"{handler}-dl") == 1
    assert queue_size(handler) == 0


def test_all_interactive_offers_each_event_once_and_counts_those_left(
    handler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 3)
    monkeypatch.setattr("sys.stdin", StringIO("r\nl\nd\n"))
    monkeypatch.setattr("select.select", lambda x, y, z, *args: (x, y, z))

    lines = run(handler, "--all", "--interactive")

    assert lines.count("Please specify action for:") == 3
    assert lines[-2] == f"1 dead-lettered events remaining for {handler}"
    wait_size(handler, 1)
    wait_size(f"{handler}-dl", 1)
    ((_, _, body),) = get_messages(f"{handler}-dl")
    assert DomainEvent.from_json(body).data == {"n": 1}


def test_several_queues(names: Names) -> None:
    first, second = names.new("test-replay"), names.new("test-replay")
    for name in (first, second):
        declare_handler(name)
        for n in range(2):
            dead_letter_library_style(name, make_event(name, {"n": n}))
        wait_size(f"{name}-dl", 2)

    assert run(first, second, "--all") == [
        f"0 dead-lettered events remaining for {first}",
        f"0 dead-lettered events remaining for {second}",
        "",
    ]
    wait_size(first, 2)
    wait_size(second, 2)


def test_a_handler_without_dead_letter_queue(names: Names) -> None:
    name = names.new("test-replay")

    with pytest.raises(CommandError, match=f"{name}-dl"):
        run(name)

    assert not queue_exists(f"{name}-dl")
    assert not queue_exists(name)


def test_prompt_waits_in_slices_and_keeps_the_connection_alive(
    handler: str, dead_letter: DomainEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    def silent_select(
        r: Any, w: Any, x: Any, timeout: float
    ) -> tuple[list[Any], list[Any], list[Any]]:
        waits.append(timeout)
        return [], [], []

    monkeypatch.setattr("sys.stdin", StringIO(""))
    monkeypatch.setattr("select.select", silent_select)
    serviced: list[None] = []
    real_keepalive = rotation.Session.keepalive

    def counting_keepalive(session: rotation.Session) -> None:
        serviced.append(None)
        real_keepalive(session)

    monkeypatch.setattr(rotation.Session, "keepalive", counting_keepalive)

    lines = run(handler, "--interactive")

    assert "(R)eplay, (D)iscard or (L)eave? Timed out. Message left in queue." in lines
    # 30 seconds in slices of at most one second, the connection serviced between.
    assert len(waits) == 30 and max(waits) <= 1.0
    assert len(serviced) == 30
    wait_size(f"{handler}-dl", 1)
