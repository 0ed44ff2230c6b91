"""Dead letters at scale, against the real broker: runs that hold nothing,
keep order and headers, survive a lost connection, filters, summaries,
export and import, discard, and honest counts when replaying fails."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pika
import pika.exceptions
import pytest

from domain_event_broker import DomainEvent
from domain_event_broker._deadletters import run as rotation
from domain_event_broker._deadletters.run_channel import RunChannel
from domain_event_broker.replay import (
    DISCARD,
    LEAVE,
    RETRY,
    DeadLetter,
    DeadLetterFilter,
    ReplayIncompleteError,
    discard_dead_letters,
    export_dead_letters,
    import_dead_letters,
    replay_all,
    replay_dead_letters,
    replay_event,
    summarize_dead_letters,
)

from .conftest import Names
from .faults.proxy import TcpProxy
from .helpers import get_messages, queue_size, raw_connection, wait_for
from .replay_helpers import dead_letter_library_style, declare_handler


@pytest.fixture
def handler(names: Names) -> str:
    name = names.new("test-replay-scale")
    declare_handler(name)
    return name


def wait_size(queue: str, expected: int) -> None:
    wait_for(lambda: queue_size(queue) == expected, message=f"{queue} to hold {expected}")


def fill(
    name: str,
    count: int,
    *,
    key: str | None = None,
    headers: dict[str, Any] | None = None,
    start: int = 0,
    direct: bool = False,
) -> list[tuple[bytes, pika.BasicProperties]]:
    """``count`` dead letters {"n": start..} in ``name-dl``, as the subscriber
    writes them; ``direct``: through the default exchange, so their routing
    key is the queue's name (as after a shovel)."""
    published = []
    connection = raw_connection()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for n in range(start, start + count):
            event = DomainEvent(routing_key=key or f"{name}.happened", data={"n": n})
            body = event.to_json().encode()
            properties = pika.BasicProperties(
                delivery_mode=2,
                message_id=event.uuid_string,
                headers={
                    "x-exception-type": "builtins.KeyError",
                    "x-failed-handler": "app.h",
                    "x-failed-at": int(time.time()) - 60,
                    "x-retry-count": 1,
                    "seq": n,
                    **(headers or {}),
                },
            )
            channel.basic_publish(
                "" if direct else f"{name}-dlx",
                f"{name}-dl" if direct else event.routing_key,
                body,
                properties,
                mandatory=True,
            )
            published.append((body, properties))
    finally:
        connection.close()
    return published


def letters_in(queue: str) -> list[DeadLetter]:
    """Take every message of ``queue`` and show it as the library sees it."""
    return [
        DeadLetter.from_message(method.routing_key, properties, body)
        for method, properties, body in get_messages(queue, limit=100_000)
    ]


def numbers(queue: str) -> list[int]:
    return [DomainEvent.from_json(body).data["n"] for _, _, body in get_messages(queue, 100_000)]


# -- holding nothing -------------------------------------------------------------------


def test_a_leave_run_holds_a_bounded_window_and_keeps_order_and_headers(handler: str) -> None:
    count = rotation.BATCH_SIZE * 2 + 30
    before = fill(handler, count)
    wait_size(f"{handler}-dl", count)
    unacked: list[int] = []

    def leave(event: DomainEvent | None) -> str:
        ready = queue_size(f"{handler}-dl")
        assert ready is not None
        unacked.append(count - ready)  # every message is ready, held or moved
        return LEAVE

    result = replay_dead_letters(handler, leave)

    assert (result.left, result.remaining) == (count, count)
    assert max(unacked) <= rotation.PREFETCH
    after = letters_in(f"{handler}-dl")
    assert [dead.body for dead in after] == [body for body, _ in before]
    for dead, (_, properties) in zip(after, before, strict=True):
        assert dead.routing_key == f"{handler}.happened"
        assert vars(dead.properties) == vars(properties)


def test_events_left_are_offered_again_by_the_next_run_as_3_0_2_callbacks_expect(
    handler: str,
) -> None:
    fill(handler, 3, headers={"tenant": "acme"})
    wait_size(f"{handler}-dl", 3)
    assert replay_all(handler, lambda **kwargs: LEAVE) == 3
    seen: list[tuple[str, object, object]] = []

    def old_style(frame: Any, header: Any, body: bytes) -> str:
        seen.append((frame.routing_key, header.headers.get("tenant"), header.headers.get("seq")))
        return RETRY

    assert replay_all(handler, old_style) == 0

    assert seen == [(f"{handler}.happened", "acme", n) for n in range(3)]
    wait_size(handler, 3)
    for method, properties, _ in get_messages(handler):
        assert method.routing_key == f"{handler}.happened"
        assert "x-original-routing-key" not in properties.headers
        assert properties.headers["tenant"] == "acme"


def test_events_dead_lettered_during_the_run_are_not_visited(handler: str) -> None:
    fill(handler, 5)
    wait_size(f"{handler}-dl", 5)
    offered: list[int] = []

    def decide(event: DomainEvent | None) -> str:
        assert event is not None
        offered.append(event.data["n"])
        # Meanwhile the handler dead-letters new events into the same queue.
        fill(handler, 1, start=100 + event.data["n"])
        return LEAVE if event.data["n"] % 2 else RETRY

    result = replay_dead_letters(handler, decide)

    assert offered == [0, 1, 2, 3, 4]
    assert (result.replayed, result.left, result.remaining) == (3, 2, 7)
    remaining = numbers(f"{handler}-dl")
    assert sorted(remaining) == [1, 3, 100, 101, 102, 103, 104]
    # The events left keep their relative order; so do the new ones.
    assert [n for n in remaining if n < 100] == [1, 3]
    assert [n for n in remaining if n >= 100] == [100, 101, 102, 103, 104]


def test_dead_letters_published_during_a_long_run_are_confirmed_and_not_visited(
    handler: str,
) -> None:
    # Their confirmation time is measured by benchmarks/bench_replay.py;
    # here: they are confirmed while the run goes on, and left for the next.
    count = 1000
    fill(handler, count)
    wait_size(f"{handler}-dl", count)
    connection = raw_connection()
    channel = connection.channel()
    channel.confirm_delivery()
    late = 0
    offered = 0

    def leave(event: DomainEvent | None) -> str:
        nonlocal late, offered
        assert event is not None and event.data.get("late") is None
        offered += 1
        if offered % 100 == 0:
            channel.basic_publish(  # raises if not confirmed
                f"{handler}-dlx",
                f"{handler}.late",
                DomainEvent(routing_key=f"{handler}.late", data={"late": True}).to_json().encode(),
                mandatory=True,
            )
            late += 1
        return LEAVE

    try:
        result = replay_dead_letters(handler, leave)
    finally:
        connection.close()
    assert (offered, late) == (count, 10)
    assert (result.left, result.remaining) == (count, count + late)


# -- a lost connection -------------------------------------------------------------------


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_url(broker_url) as running:
        yield running


def test_a_connection_cut_mid_run_loses_nothing_and_repeats_nothing(
    handler: str, proxy: TcpProxy, broker_url: str
) -> None:
    count = rotation.BATCH_SIZE * 3 + 10
    fill(handler, count)
    wait_size(f"{handler}-dl", count)
    offered: list[int] = []

    def decide(event: DomainEvent | None) -> str:
        assert event is not None
        n = event.data["n"]
        offered.append(n)
        if n in (rotation.BATCH_SIZE + 5, 2 * rotation.BATCH_SIZE + 50):
            assert proxy.cut() >= 1  # our own connection only
        return LEAVE if n % 3 == 0 else RETRY

    result = replay_dead_letters(handler, decide, proxy.url(broker_url))

    assert offered == list(range(count))  # nobody asked twice
    left = [n for n in range(count) if n % 3 == 0]
    assert (result.left, result.replayed) == (len(left), count - len(left))
    wait_size(handler, count - len(left))
    assert numbers(handler) == [n for n in range(count) if n % 3]
    assert numbers(f"{handler}-dl") == left


@pytest.mark.parametrize("committed", [True, False], ids=["commit-reached", "commit-lost"])
def test_a_connection_lost_around_a_commit_does_each_event_once(
    handler: str, proxy: TcpProxy, broker_url: str, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    count = rotation.BATCH_SIZE * 2 + 10
    fill(handler, count)
    wait_size(f"{handler}-dl", count)
    real_commit = RunChannel.commit
    calls: list[bool] = []

    def commit_then_lose(channel: RunChannel) -> list[tuple[str, str]]:
        # The third batch's commit (probes are committed on a channel of
        # their own, not by RunChannel.commit).
        calls.append(True)
        if len(calls) == 3:
            if committed:
                real_commit(channel)  # the broker commits; its answer is "lost"
            proxy.cut()
            raise pika.exceptions.StreamLostError("cut by the test")
        return real_commit(channel)

    monkeypatch.setattr(RunChannel, "commit", commit_then_lose)

    result = replay_dead_letters(
        handler, lambda event: LEAVE if event.data["n"] % 2 else RETRY, proxy.url(broker_url)
    )

    assert (result.replayed, result.left) == (count // 2, count // 2)
    wait_size(handler, count // 2)
    assert numbers(handler) == list(range(0, count, 2))
    assert numbers(f"{handler}-dl") == list(range(1, count, 2))


# -- filters ------------------------------------------------------------------------------


def test_filters_pick_exactly_the_right_events(handler: str) -> None:
    kinds = [
        ("builtins.KeyError", "app.a", f"{handler}.created", 7200),
        ("builtins.KeyError", "app.a", f"{handler}.created", 10),
        ("builtins.KeyError", "app.b", f"{handler}.deleted", 7200),
        ("app.errors.Timeout", "app.a", f"{handler}.created", 7200),
        ("app.errors.KeyErrorish", "app.a", f"{handler}.created", 7200),
    ]
    for n, (exception, failed, key, age) in enumerate(kinds):
        dead_letter_library_style(
            handler,
            DomainEvent(routing_key=key, data={"n": n}),
            exception=(exception, "boom"),
            headers={"x-failed-handler": failed, "x-failed-at": int(time.time() - age)},
        )
    wait_size(f"{handler}-dl", len(kinds))
    where = DeadLetterFilter(exception="KeyError", routing_key=f"{handler}.*", older_than=3600)

    summary = summarize_dead_letters(handler, where=where)
    assert (summary.total, summary.scanned) == (2, 5)
    assert dict(summary.by_handler) == {"app.a": 1, "app.b": 1}

    result = replay_dead_letters(handler, where=where)

    assert (result.replayed, result.skipped, result.offered, result.remaining) == (2, 3, 2, 3)
    wait_size(handler, 2)
    assert numbers(handler) == [0, 2]
    assert numbers(f"{handler}-dl") == [1, 3, 4]  # the others, still in order


def test_summary_counts_and_leaves_everything_in_order(handler: str) -> None:
    fill(handler, 4)
    fill(handler, 2, key=f"{handler}.other", start=4, headers={"x-exception-type": "app.Boom"})
    wait_size(f"{handler}-dl", 6)
    progress: list[int] = []

    summary = summarize_dead_letters(
        handler, on_progress=lambda so_far, total: progress.append(total)
    )

    assert summary.total == summary.scanned == 6
    assert dict(summary.by_exception) == {"builtins.KeyError": 4, "app.Boom": 2}
    assert dict(summary.by_routing_key) == {f"{handler}.happened": 4, f"{handler}.other": 2}
    assert dict(summary.by_age) == {"1m-10m": 6}
    assert progress == [6] * 6
    assert numbers(f"{handler}-dl") == list(range(6))


# -- export, import, discard ------------------------------------------------------------------


def test_export_then_import_round_trips_byte_for_byte(handler: str) -> None:
    headers = {
        "bytes": b"\x00\xff raw",
        "decimal": Decimal("12.50"),
        "when": datetime(2026, 5, 4, 3, 2, 1),
        "flag": True,
        "nested": {"list": [1, "two", b"3"], "$bytes": "not a tag"},
        "nothing": None,
    }
    dead_letter_library_style(handler, headers=headers, correlation_id="c-1", priority=4)
    dead_letter_library_style(handler, body=b"\xffnot json at all\n", message_id="m-2")
    connection = raw_connection()
    connection.channel().basic_publish("", f"{handler}-dl", b"{}", pika.BasicProperties())
    connection.close()
    wait_size(f"{handler}-dl", 3)
    file = io.StringIO()

    assert export_dead_letters(handler, file) == 3

    wait_size(f"{handler}-dl", 3)  # nothing removed
    originals = letters_in(f"{handler}-dl")
    assert len(file.getvalue().splitlines()) == 3
    file.seek(0)

    assert import_dead_letters(handler, file) == 3

    wait_size(f"{handler}-dl", 3)
    back = letters_in(f"{handler}-dl")
    assert [(d.routing_key, d.body, vars(d.properties)) for d in back] == [
        (d.routing_key, d.body, vars(d.properties)) for d in originals
    ]
    assert back[0].properties.headers["bytes"] == b"\x00\xff raw"


def test_import_checks_the_whole_file_before_sending(handler: str) -> None:
    file = io.StringIO('{"routing_key": "a", "body": ""}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        import_dead_letters(handler, file)
    assert queue_size(f"{handler}-dl") == 0


def test_discard_with_a_filter_exports_first(handler: str) -> None:
    fill(handler, 3)
    fill(handler, 2, key=f"{handler}.test", start=3)
    wait_size(f"{handler}-dl", 5)
    saved = io.StringIO()

    result = discard_dead_letters(
        handler, where=DeadLetterFilter(routing_key=f"{handler}.test"), export_to=saved
    )

    assert (result.discarded, result.skipped, result.remaining) == (2, 3, 3)
    assert len(saved.getvalue().splitlines()) == 2
    saved.seek(0)
    assert import_dead_letters(handler, saved) == 2
    assert numbers(f"{handler}-dl") == [0, 1, 2, 3, 4]


# -- counts when replaying fails ----------------------------------------------------------------


def test_unroutable_events_are_counted_and_the_rest_is_done(handler: str) -> None:
    fill(handler, 2)
    fill(handler, 2, start=2, direct=True)  # routing key: the -dl queue's name
    fill(handler, 2, start=4)
    wait_size(f"{handler}-dl", 6)
    answers = {0: RETRY, 1: DISCARD, 2: RETRY, 3: LEAVE, 4: RETRY, 5: RETRY}

    with pytest.raises(ReplayIncompleteError, match=f"'{handler}-dl'") as caught:
        replay_dead_letters(handler, lambda event: answers[event.data["n"]])

    result = caught.value.result
    assert (result.replayed, result.discarded, result.left, result.unroutable) == (3, 1, 1, 1)
    assert result.remaining == 2
    wait_size(handler, 3)
    assert numbers(handler) == [0, 4, 5]
    assert sorted(numbers(f"{handler}-dl")) == [2, 3]


def test_an_interactive_run_survives_losing_its_connection_while_waiting(
    handler: str, proxy: TcpProxy, broker_url: str
) -> None:
    fill(handler, 4)
    wait_size(f"{handler}-dl", 4)
    assert replay_all(handler, lambda **kwargs: LEAVE) == 4  # now moved: keys in a header
    asked: list[tuple[int, str]] = []

    def prompt(frame: Any, event: DomainEvent | None, keepalive: Any) -> str:
        assert event is not None
        asked.append((event.data["n"], frame.routing_key))
        if event.data["n"] == 1:
            # As if the broker's consumer_timeout closed the channel, or the
            # network went, while the operator was thinking.
            assert proxy.cut() >= 1
            keepalive()
        return RETRY if event.data["n"] % 2 else LEAVE

    result = replay_dead_letters(handler, prompt, proxy.url(broker_url))

    assert asked == [(n, f"{handler}.happened") for n in range(4)]
    assert (result.replayed, result.left) == (2, 2)
    wait_size(handler, 2)
    assert numbers(handler) == [1, 3]
    assert numbers(f"{handler}-dl") == [0, 2]


def test_an_interactive_run_holds_only_the_event_on_screen(handler: str) -> None:
    count = 5
    fill(handler, count)
    wait_size(f"{handler}-dl", count)
    held: list[int] = []

    def prompt(event: DomainEvent | None, keepalive: Any) -> str:
        keepalive()
        ready = queue_size(f"{handler}-dl")
        assert ready is not None
        held.append(count - ready)
        return LEAVE

    assert replay_all(handler, prompt) == count

    assert held == [1] * count
    assert numbers(f"{handler}-dl") == list(range(count))


def test_replaying_one_event_takes_only_that_one(handler: str) -> None:
    fill(handler, 5)
    wait_size(f"{handler}-dl", 5)

    assert replay_event(handler) == 4

    wait_size(handler, 1)
    remaining = get_messages(f"{handler}-dl")
    assert [DomainEvent.from_json(body).data["n"] for _, _, body in remaining] == [1, 2, 3, 4]
    # Never sent to the replay, so never returned: not marked redelivered.
    assert [method.redelivered for method, _, _ in remaining] == [False] * 4


def test_events_whose_handler_is_unbound_mid_run_are_put_back(handler: str) -> None:
    count = rotation.BATCH_SIZE + 50
    fill(handler, count)
    wait_size(f"{handler}-dl", count)

    def retry(event: DomainEvent | None) -> str:
        assert event is not None
        if event.data["n"] == rotation.BATCH_SIZE + 20:  # its key was routed in batch 1
            connection = raw_connection()
            connection.channel().queue_unbind(handler, f"{handler}-retry", f"{handler}.*")
            connection.close()
        return RETRY

    with pytest.raises(ReplayIncompleteError) as caught:
        replay_dead_letters(handler, retry)

    result = caught.value.result
    assert (result.replayed, result.unroutable, result.remaining) == (
        rotation.BATCH_SIZE,
        50,
        50,
    )
    wait_size(handler, rotation.BATCH_SIZE)
    assert numbers(handler) == list(range(rotation.BATCH_SIZE))
    assert numbers(f"{handler}-dl") == list(range(rotation.BATCH_SIZE, count))
