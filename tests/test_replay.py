"""Replaying dead letters (``domain_event_broker.replay``) against the real broker."""

from __future__ import annotations

import json
from typing import Any

import pika
import pytest

from domain_event_broker import (
    UNSET,
    BrokerError,
    DeadLetterQueueNotFoundError,
    DomainEvent,
    PublishError,
)
from domain_event_broker import replay as replay_module
from domain_event_broker._amqp import link as link_module
from domain_event_broker.replay import (
    DISCARD,
    LEAVE,
    RETRY,
    handler_status,
    inspect_dead_letters,
    replay_all,
    replay_dead_letters,
    replay_event,
    retry_event,
)

from .conftest import Names
from .helpers import (
    exchange_exists,
    get_messages,
    queue_exists,
    queue_size,
    raw_connection,
    wait_for,
)
from .replay_helpers import (
    dead_letter_302_style,
    dead_letter_library_style,
    declare_handler,
    make_event,
)


@pytest.fixture
def handler(names: Names) -> str:
    """A handler name with its topology declared and an empty dead-letter queue."""
    name = names.new("test-replay")
    declare_handler(name)
    return name


def size_is(queue: str, expected: int) -> bool:
    return queue_size(queue) == expected


def wait_size(queue: str, expected: int) -> None:
    wait_for(lambda: size_is(queue, expected), message=f"{queue} to hold {expected}")


def data_of(queue: str) -> list[object]:
    return [DomainEvent.from_json(body).data for _, _, body in get_messages(queue)]


def leave(**kwargs: Any) -> str:
    return LEAVE


def discard(**kwargs: Any) -> str:
    return DISCARD


# -- RETRY ---------------------------------------------------------------------


def test_retry_republishes_with_every_property_and_header(handler: str) -> None:
    event = dead_letter_library_style(
        handler,
        headers={"tenant": "acme", "trace-id": "abc"},
        correlation_id="corr-1",
        app_id="billing",
        priority=3,
    )
    wait_size(f"{handler}-dl", 1)

    assert replay_event(handler) == 0

    wait_size(handler, 1)
    assert queue_size(f"{handler}-dl") == 0
    ((method, properties, body),) = get_messages(handler)
    assert DomainEvent.from_json(body) == event
    assert method.routing_key == event.routing_key
    assert method.exchange == f"{handler}-retry"
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    assert properties.message_id == event.uuid_string
    assert properties.timestamp == int(event.timestamp)
    assert properties.correlation_id == "corr-1"
    assert properties.app_id == "billing"
    assert properties.priority == 3
    headers = properties.headers
    assert headers["tenant"] == "acme"
    assert headers["trace-id"] == "abc"
    assert headers["x-exception-type"] == "app.errors.PaymentFailed"
    assert headers["x-failed-handler"] == "app.handlers.charge"
    # The handler gets its retries again.
    assert "x-retry-count" not in headers


def test_retry_of_a_302_dead_letter_drops_death_headers_and_stays_persistent(
    handler: str,
) -> None:
    event = dead_letter_302_style(handler)
    wait_size(f"{handler}-dl", 1)
    ((_, properties, _),) = get_messages(f"{handler}-dl")  # sanity check of the fixture
    assert "x-death" in properties.headers
    dead_letter_302_style(handler, event)
    wait_size(f"{handler}-dl", 1)

    assert replay_event(handler) == 0

    wait_size(handler, 1)
    ((method, properties, body),) = get_messages(handler)
    assert DomainEvent.from_json(body) == event
    assert method.routing_key == event.routing_key
    assert properties.delivery_mode == 2
    headers = properties.headers or {}
    assert not [
        key
        for key in headers
        if key == "x-death" or key.startswith(("x-first-death", "x-last-death"))
    ]


def test_replay_event_returns_the_number_of_other_dead_letters(handler: str) -> None:
    events = [dead_letter_library_style(handler, make_event(handler, {"n": n})) for n in range(3)]
    wait_size(f"{handler}-dl", 3)

    assert replay_event(handler) == 2

    wait_size(handler, 1)
    ((_, _, body),) = get_messages(handler)
    assert DomainEvent.from_json(body) == events[0]  # oldest first
    assert queue_size(f"{handler}-dl") == 2


def test_replay_all_moves_everything_over_one_connection(
    handler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [dead_letter_library_style(handler, make_event(handler, {"n": n})) for n in range(5)]
    wait_size(f"{handler}-dl", 5)
    connections: list[object] = []
    real_connect = link_module.connect

    def counting_connect(*args: Any, **kwargs: Any) -> pika.BlockingConnection:
        connection = real_connect(*args, **kwargs)
        connections.append(connection)
        return connection

    monkeypatch.setattr(link_module, "connect", counting_connect)

    assert replay_all(handler) == 0

    assert len(connections) == 1
    wait_size(handler, 5)
    received = [DomainEvent.from_json(body) for _, _, body in get_messages(handler)]
    assert received == events
    assert queue_size(f"{handler}-dl") == 0


def test_replay_of_an_empty_queue(handler: str) -> None:
    assert replay_event(handler) == 0
    assert replay_all(handler) == 0
    assert queue_size(handler) == 0


# -- LEAVE and DISCARD -----------------------------------------------------------


def test_leave_keeps_the_event_in_place(handler: str) -> None:
    event = dead_letter_library_style(handler, headers={"tenant": "acme"})
    wait_size(f"{handler}-dl", 1)

    # 3.0.2 returns 0 here: the event offered is not counted.
    assert replay_event(handler, message_callback=leave) == 0

    wait_size(f"{handler}-dl", 1)
    assert queue_size(handler) == 0
    ((_, properties, body),) = get_messages(f"{handler}-dl")
    assert DomainEvent.from_json(body) == event
    assert properties.headers["tenant"] == "acme"
    assert properties.headers["x-retry-count"] == 2


def test_discard_removes_the_event(handler: str) -> None:
    dead_letter_library_style(handler)
    wait_size(f"{handler}-dl", 1)

    assert replay_event(handler, message_callback=discard) == 0

    wait_size(f"{handler}-dl", 0)
    assert queue_size(handler) == 0


def test_replay_all_offers_each_event_once_when_left(handler: str) -> None:
    events = [dead_letter_library_style(handler, make_event(handler, {"n": n})) for n in range(5)]
    wait_size(f"{handler}-dl", 5)
    offered: list[DomainEvent | None] = []

    def leave_all(event: DomainEvent | None, **kwargs: Any) -> str:
        offered.append(event)
        return LEAVE

    assert replay_all(handler, leave_all) == 5

    assert offered == events
    wait_size(f"{handler}-dl", 5)
    # Still in their original order.
    remaining = [DomainEvent.from_json(body) for _, _, body in get_messages(f"{handler}-dl")]
    assert remaining == events


def test_replay_all_with_mixed_answers(handler: str) -> None:
    for n in range(6):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 6)
    answers = {0: RETRY, 1: DISCARD, 2: LEAVE, 3: RETRY, 4: LEAVE, 5: DISCARD}
    progress: list[tuple[int, int]] = []

    def decide(event: DomainEvent | None, **kwargs: Any) -> str:
        assert event is not None
        return answers[event.data["n"]]

    result = replay_dead_letters(
        handler, decide, on_progress=lambda so_far, total: progress.append((so_far.offered, total))
    )

    assert (result.replayed, result.discarded, result.left, result.remaining) == (2, 2, 2, 2)
    assert progress == [(n, 6) for n in range(1, 7)]
    wait_size(handler, 2)
    assert sorted(DomainEvent.from_json(b).data["n"] for _, _, b in get_messages(handler)) == [0, 3]
    assert sorted(
        DomainEvent.from_json(b).data["n"] for _, _, b in get_messages(f"{handler}-dl")
    ) == [2, 4]


def test_limit(handler: str) -> None:
    for n in range(4):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 4)

    result = replay_dead_letters(handler, limit=3)

    assert (result.replayed, result.remaining) == (3, 1)
    wait_size(handler, 3)


def test_events_dead_lettered_during_the_run_are_not_offered(handler: str) -> None:
    for n in range(3):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 3)
    offered: list[int] = []

    def retry_and_fail_again(event: DomainEvent | None, **kwargs: Any) -> str:
        assert event is not None
        offered.append(event.data["n"])
        # As if the handler failed again at once on a replayed event.
        dead_letter_library_style(handler, make_event(handler, {"n": 100 + event.data["n"]}))
        return RETRY

    remaining = replay_all(handler, retry_and_fail_again)

    assert offered == [0, 1, 2]
    assert remaining == 3


# -- wrong answers and failures --------------------------------------------------


@pytest.mark.parametrize("answer", ["replay", None, "RETRY", 1])
def test_an_invalid_answer_raises_value_error_and_leaves_the_event(
    handler: str, answer: object
) -> None:
    event = dead_letter_library_style(handler)
    wait_size(f"{handler}-dl", 1)

    with pytest.raises(ValueError, match="returned"):
        replay_event(handler, lambda **kwargs: answer)

    wait_size(f"{handler}-dl", 1)
    assert queue_size(handler) == 0
    ((_, _, body),) = get_messages(f"{handler}-dl")
    assert DomainEvent.from_json(body) == event


def test_an_invalid_answer_in_replay_all_keeps_the_events_left_so_far(handler: str) -> None:
    for n in range(4):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 4)
    answers = iter([RETRY, LEAVE, "oops"])

    with pytest.raises(ValueError, match="'oops'"):
        replay_all(handler, lambda **kwargs: next(answers))

    wait_size(f"{handler}-dl", 3)
    wait_size(handler, 1)
    remaining = sorted(
        DomainEvent.from_json(b).data["n"] for _, _, b in get_messages(f"{handler}-dl")
    )
    assert remaining == [1, 2, 3]


def test_an_exception_in_the_callback_leaves_the_event(handler: str) -> None:
    dead_letter_library_style(handler)
    wait_size(f"{handler}-dl", 1)

    def broken(**kwargs: Any) -> str:
        raise RuntimeError("callback bug")

    with pytest.raises(RuntimeError, match="callback bug"):
        replay_all(handler, broken)

    wait_size(f"{handler}-dl", 1)
    assert queue_size(handler) == 0


def test_unroutable_replay_leaves_the_dead_letter(handler: str) -> None:
    dead_letter_library_style(handler)
    wait_size(f"{handler}-dl", 1)
    connection = raw_connection()
    connection.channel().queue_unbind(handler, f"{handler}-retry", f"{handler}.*")
    connection.close()

    with pytest.raises(PublishError, match=f"'{handler}.happened'.* left in place"):
        replay_event(handler)

    wait_size(f"{handler}-dl", 1)


def test_missing_retry_exchange_leaves_the_dead_letter(handler: str) -> None:
    for n in range(2):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 2)
    connection = raw_connection()
    connection.channel().exchange_delete(f"{handler}-retry")
    connection.close()

    with pytest.raises(PublishError, match="does not exist") as caught:
        replay_all(handler)

    assert isinstance(caught.value.__cause__, pika.exceptions.ChannelClosedByBroker)
    wait_size(f"{handler}-dl", 2)


def test_only_unroutable_events_stay_when_a_batch_is_partly_unroutable(handler: str) -> None:
    dead_letter_library_style(handler, make_event(handler, {"n": 0}))
    # A dead letter whose routing key the handler is not bound to.
    connection = raw_connection()
    connection.channel().basic_publish(
        "", f"{handler}-dl", make_event(handler, {"n": 1}).to_json().encode()
    )
    connection.close()
    dead_letter_library_style(handler, make_event(handler, {"n": 2}))
    wait_size(f"{handler}-dl", 3)

    with pytest.raises(PublishError, match=f"'{handler}-dl'"):
        replay_all(handler)

    wait_size(handler, 2)
    wait_size(f"{handler}-dl", 1)
    assert data_of(handler) == [{"n": 0}, {"n": 2}]
    assert data_of(f"{handler}-dl") == [{"n": 1}]


def test_dead_letters_stay_when_the_batch_cannot_be_committed(handler: str) -> None:
    for n in range(3):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 3)
    calls: list[int] = []

    def retry_then_break_the_topology(event: DomainEvent | None) -> str:
        calls.append(1)
        if len(calls) == 2:  # the first copy is published, not committed yet
            connection = raw_connection()
            connection.channel().exchange_delete(f"{handler}-retry")
            connection.close()
        return RETRY

    with pytest.raises(BrokerError):
        replay_all(handler, retry_then_break_the_topology)

    wait_size(f"{handler}-dl", 3)
    assert queue_size(handler) == 0


def test_a_waiting_callback_has_each_answer_carried_out_at_once(handler: str) -> None:
    for n in range(2):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
    wait_size(f"{handler}-dl", 2)
    seen_in_queue: list[int | None] = []

    def prompt(event: DomainEvent | None, keepalive: Any) -> str:
        # While asked about the second event, the first one is already back.
        seen_in_queue.append(queue_size(handler))
        return RETRY

    assert replay_all(handler, prompt) == 0

    assert seen_in_queue == [0, 1]


def test_more_events_than_one_batch(handler: str) -> None:
    count = replay_module.BATCH_SIZE * 2 + 7
    connection = raw_connection()
    channel = connection.channel()
    channel.confirm_delivery()
    for n in range(count):
        channel.basic_publish(
            f"{handler}-dlx",
            f"{handler}.happened",
            make_event(handler, {"n": n}).to_json().encode(),
            pika.BasicProperties(delivery_mode=2),
        )
    connection.close()
    wait_size(f"{handler}-dl", count)

    assert replay_all(handler) == 0

    wait_size(handler, count)
    assert data_of(handler) == [{"n": n} for n in range(count)]


def test_a_handler_without_dead_letter_queue(names: Names) -> None:
    plain = names.new("test-replay")
    declare_handler(plain, dead_letter=False)
    unknown = names.new("test-replay")

    for name in (plain, unknown):
        for call in (replay_event, replay_all, inspect_dead_letters):
            with pytest.raises(DeadLetterQueueNotFoundError, match=f"{name}-dl") as caught:
                call(name)
            assert isinstance(caught.value.__cause__, pika.exceptions.ChannelClosedByBroker)

    # Nothing was created on the broker.
    assert not queue_exists(f"{plain}-dl")
    assert not exchange_exists(f"{plain}-dlx")
    assert not queue_exists(unknown)
    assert not queue_exists(f"{unknown}-dl")
    assert not exchange_exists(f"{unknown}-retry")
    assert not exchange_exists(f"{unknown}-dlx")


# -- settings ---------------------------------------------------------------------


def test_none_means_no_broker(names: Names) -> None:
    name = names.new("test-replay")  # does not exist: no broker is asked
    assert replay_event(name, connection_settings=None) == 0
    assert replay_all(name, connection_settings=None) == 0
    assert replay_dead_letters(name, connection_settings=None).offered == 0
    assert inspect_dead_letters(name, connection_settings=None) == []


@pytest.mark.parametrize("settings", ["", UNSET, "broker_url"])
def test_default_and_explicit_settings(
    handler: str, settings: object, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", broker_url)
    if settings == "broker_url":
        monkeypatch.setenv("DOMAIN_EVENT_BROKER", "amqp://nobody:secret@127.0.0.1:1/%2F")
        settings = broker_url
    dead_letter_library_style(handler)
    wait_size(f"{handler}-dl", 1)

    assert replay_event(handler, connection_settings=settings) == 0  # type: ignore[arg-type]

    wait_size(handler, 1)


# -- callbacks ---------------------------------------------------------------------


def test_callback_arguments(handler: str) -> None:
    event = dead_letter_library_style(handler)
    dead_letter_library_style(handler, body=b"\xffnot json")
    wait_size(f"{handler}-dl", 2)
    calls: list[tuple[str, dict[str, Any]]] = []

    def old_style(frame: Any, header: Any, body: bytes) -> str:
        calls.append(("old", {"frame": frame, "header": header, "body": body}))
        return LEAVE

    def old_style_kwargs(**kwargs: Any) -> str:
        calls.append(("kwargs", kwargs))
        return LEAVE

    def new_style(body: bytes, event: DomainEvent | None, keepalive: Any) -> str:
        keepalive()
        calls.append(("new", {"body": body, "event": event, "keepalive": keepalive}))
        return LEAVE

    def event_only(event: DomainEvent | None) -> str:
        calls.append(("event", {"event": event}))
        return LEAVE

    for callback in (old_style, old_style_kwargs, new_style, event_only):
        assert replay_all(handler, callback) == 2

    old = [kwargs for kind, kwargs in calls if kind == "old"]
    assert [kwargs["frame"].routing_key for kwargs in old] == [event.routing_key] * 2
    assert old[0]["header"].headers["x-retry-count"] == 2
    assert old[0]["body"] == event.to_json().encode()
    with_kwargs = [kwargs for kind, kwargs in calls if kind == "kwargs"]
    assert sorted(with_kwargs[0]) == ["body", "event", "frame", "header"]
    assert with_kwargs[0]["event"] == event
    assert with_kwargs[1]["event"] is None  # malformed body
    new = [kwargs for kind, kwargs in calls if kind == "new"]
    assert [kwargs["event"] for kwargs in new] == [event, None]
    assert new[1]["body"] == b"\xffnot json"
    assert [kwargs["event"] for kind, kwargs in calls if kind == "event"] == [event, None]


def test_retry_event_is_the_302_default() -> None:
    assert retry_event(body=b"{}", frame=None, header=None) == RETRY
    assert (RETRY, LEAVE, DISCARD) == ("retry", "leave", "discard")


# -- inspect and status -------------------------------------------------------------


def test_inspect_shows_dead_letters_and_leaves_them(handler: str) -> None:
    first = dead_letter_library_style(handler, retry_count=3)
    second = dead_letter_302_style(handler, make_event(handler, {"n": 2}))
    dead_letter_library_style(handler, body=b"not json", message_id="m-3")
    wait_size(f"{handler}-dl", 3)

    letters = inspect_dead_letters(handler)

    assert [letter.event for letter in letters] == [first, second, None]
    new, old, malformed = letters
    assert new.routing_key == first.routing_key
    assert new.uuid_string == first.uuid_string
    assert new.retry_count == 3
    assert new.reason == "app.errors.PaymentFailed: card declined"
    assert new.failed_handler == "app.handlers.charge"
    age = new.age()
    assert age is not None and 80 < age < 200
    assert old.reason.startswith("rejected by queue " + handler)
    assert old.retry_count == 0
    assert old.failed_at is not None
    assert malformed.uuid_string == "m-3"
    summary = malformed.as_dict()
    assert summary["event"] is None and summary["body"] == "not json"
    json.dumps([letter.as_dict() for letter in letters])

    wait_size(f"{handler}-dl", 3)
    assert [letter.event for letter in inspect_dead_letters(handler, limit=1)] == [first]
    remaining = [body for _, _, body in get_messages(f"{handler}-dl")]
    assert remaining[0] == first.to_json().encode()
    assert len(remaining) == 3


def test_handler_status(handler: str, names: Names) -> None:
    for n in range(2):
        dead_letter_library_style(handler, make_event(handler, {"n": n}))
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
        wait_size(f"{handler}-dl", 2)

        status = handler_status(handler, delays=[2.5, 60])

        assert (status.queue.name, status.queue.messages, status.queue.consumers) == (handler, 0, 1)
        assert (status.dead_letter_queue.messages, status.dead_letter_queue.consumers) == (2, 0)
        assert [(q.name, q.messages) for q in status.delay_queues] == [
            (f"{handler}-delay-60000", 1)
        ]
        assert status.as_dict()["dead_letter_queue"]["messages"] == 2
    finally:
        channel.queue_delete(f"{handler}-delay-60000")
        connection.close()

    plain = names.new("test-replay")
    status = handler_status(plain)
    assert not status.queue.exists and not status.dead_letter_queue.exists
    assert status.delay_queues == ()
    assert not queue_exists(plain)
