"""DomainEvent: 3.0.2's constructor, equality, repr and JSON decoding (no broker)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timezone

import pytest

from domain_event_broker import DomainEvent, DomainEventBrokerError, MalformedEventError

WIRE_KEYS = ["routing_key", "data", "domain_object_id", "uuid_string", "timestamp"]


def test_defaults_match_302() -> None:
    before = time.time()
    event = DomainEvent()
    after = time.time()
    assert event.routing_key == ""
    assert event.data == {}
    assert event.domain_object_id is None
    assert str(uuid.UUID(event.uuid_string)) == event.uuid_string
    assert before - 1e-6 <= event.timestamp <= after + 1e-6
    assert event.retries == 0
    assert event.redelivered is False


def test_default_data_is_not_shared_between_events() -> None:
    first, second = DomainEvent("a.b"), DomainEvent("a.b")
    first.data["key"] = "value"
    assert second.data == {}
    assert DomainEvent("a.b").data == {}


def test_explicit_none_data_is_kept_as_in_302() -> None:
    event = DomainEvent("a.b", None)
    assert event.data is None
    assert json.loads(event.to_json())["data"] is None


def test_each_event_gets_its_own_uuid() -> None:
    assert len({DomainEvent("a.b").uuid_string for _ in range(100)}) == 100


def test_default_timestamp_has_whole_microseconds_like_302() -> None:
    event = DomainEvent("a.b")
    decimals = repr(event.timestamp).partition(".")[2]
    assert len(decimals) <= 6


def test_given_values_are_kept() -> None:
    event = DomainEvent("user.registered", {"id": 1}, "user-1", "some-uuid", 1234.5, retries=2)
    assert event.event_data == {
        "routing_key": "user.registered",
        "data": {"id": 1},
        "domain_object_id": "user-1",
        "uuid_string": "some-uuid",
        "timestamp": 1234.5,
    }
    assert event.retries == 2


def test_event_data_has_302_keys_in_302_order() -> None:
    assert list(DomainEvent("a.b").event_data) == WIRE_KEYS


def test_datetime_is_timezone_aware_utc() -> None:
    moment = DomainEvent("a.b", timestamp=0.0).datetime
    assert moment.tzinfo is timezone.utc
    assert (moment.year, moment.month, moment.day, moment.hour) == (1970, 1, 1, 0)


def test_unknown_keyword_arguments_are_ignored() -> None:
    event = DomainEvent("a.b", {}, future_field="x")
    assert "future_field" not in event.event_data


def test_equality_by_event_data() -> None:
    event = DomainEvent("a.b", {"x": 1})
    same = DomainEvent("a.b", {"x": 1}, uuid_string=event.uuid_string, timestamp=event.timestamp)
    assert event == same
    assert event != DomainEvent("a.b", {"x": 1})
    same.retries = 3  # retries are not part of the event's identity (as in 3.0.2)
    assert event == same
    assert event != event.event_data
    assert (event == "a.b") is False


def test_events_are_unhashable_because_mutable() -> None:
    with pytest.raises(TypeError):
        hash(DomainEvent("a.b"))


def test_repr_is_readable() -> None:
    event = DomainEvent("user.registered", {"secret-ish": "payload"}, "user-1")
    text = repr(event)
    assert text.startswith("DomainEvent(")
    assert "'user.registered'" in text
    assert event.uuid_string in text
    assert "user-1" in text


@pytest.mark.parametrize("as_bytes", [False, True])
def test_json_round_trip(as_bytes: bool) -> None:
    event = DomainEvent("a.b", {"text": "ünïcode", "n": [1, 2.5, None]}, "id-1")
    text = event.to_json()
    decoded = DomainEvent.from_json(text.encode("utf-8") if as_bytes else text)
    assert decoded == event
    assert decoded.event_data == event.event_data


def test_from_json_accepts_bytearray() -> None:
    event = DomainEvent("a.b")
    assert DomainEvent.from_json(bytearray(event.to_json(), "utf-8")) == event


def test_from_json_ignores_unknown_keys() -> None:
    body = json.dumps({"routing_key": "a.b", "data": {}, "added_in_5_0": True, "retries": 7})
    event = DomainEvent.from_json(body)
    assert event.routing_key == "a.b"
    assert event.retries == 0  # not taken from the body: the subscriber sets it
    assert "added_in_5_0" not in event.event_data


def test_from_json_fills_in_missing_optional_keys() -> None:
    event = DomainEvent.from_json('{"routing_key": "a.b"}')
    assert event.data == {}
    assert event.uuid_string
    assert isinstance(event.timestamp, float)


@pytest.mark.parametrize(
    "body",
    [
        "",
        "not json",
        b"\xff\xfe\x00",
        "[]",
        '"a string"',
        "42",
        "null",
        "{}",
        '{"data": {}}',
        '{"routing_key": 5}',
        '{"routing_key": null}',
        '{"routing_key": "a.b", "timestamp": "yesterday"}',
        '{"routing_key": "a.b", "timestamp": true}',
        '{"routing_key": "a.b", "uuid_string": 12}',
    ],
)
def test_from_json_rejects_what_is_not_a_domain_event(body: str | bytes) -> None:
    with pytest.raises(MalformedEventError) as info:
        DomainEvent.from_json(body)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, DomainEventBrokerError)


def test_from_json_rejects_non_text_input() -> None:
    with pytest.raises(MalformedEventError):
        DomainEvent.from_json(12)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [object(), {1, 2}, {"when": time}, b"bytes"])
def test_to_json_raises_type_error_for_unserializable_data(data: object) -> None:
    with pytest.raises(TypeError, match="not JSON-serializable"):
        DomainEvent("a.b", data).to_json()


def test_to_json_raises_type_error_for_circular_data() -> None:
    data: dict[str, object] = {}
    data["self"] = data
    with pytest.raises(TypeError):
        DomainEvent("a.b", data).to_json()
