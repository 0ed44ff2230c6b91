"""``import`` checks every line completely before sending any (issue 23,
item 8): a line that parses but cannot be encoded is refused with its line
number and field, and nothing is sent; a send that fails midway says how many
were put back."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pika
import pika.spec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from domain_event_broker import BrokerError
from domain_event_broker._cli.main import _describe
from domain_event_broker._deadletters.letters import (
    RecordError,
    check_sendable,
    from_record,
    parked_properties,
)
from domain_event_broker.replay import import_dead_letters

from .conftest import Names
from .helpers import queue_size
from .replay_helpers import declare_handler
from .test_cli import cli

GOOD: dict[str, Any] = {
    "routing_key": "order.created",
    "body": "e30=",
    "properties": {"delivery_mode": 2, "content_type": "application/json"},
    "headers": {"x-retry-count": 2, "x-exception-type": "builtins.KeyError"},
}


def line(**changes: Any) -> str:
    record = {**GOOD, **changes}
    return json.dumps({key: value for key, value in record.items() if value is not None})


# -- what pika's encoder rejects, validation refuses (no broker) -----------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["\ud800", "é" * 130, "x" * 256, "05", "-1", "1.5"])
)
tagged = st.one_of(
    st.builds(lambda b: {"$bytes": b}, st.sampled_from(["AA==", "!!", ""]) | json_scalars),
    st.builds(
        lambda d: {"$decimal": d},
        st.sampled_from(["1.5", "1e100", "-2147483648", "2147483648", "NaN", "1E-300", "x"])
        | json_scalars,
    ),
    st.builds(
        lambda t: {"$datetime": t},
        st.sampled_from(
            [
                "2026-05-04T03:02:01",
                "1969-12-31T23:59:59",
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59",
                "1970-01-01T00:00:00+00:00",
                "soon",
            ]
        )
        | json_scalars,
    ),
    st.builds(lambda f: {"$float": f}, st.sampled_from(["1.5", "inf"])),
    st.builds(lambda t: {"$table": t}, json_scalars | st.just({"a": 1})),
)
header_keys = st.text(max_size=4) | st.sampled_from(["k" * 255, "k" * 256, "é" * 128, "\udfff"])
header_values = st.recursive(
    json_scalars | tagged,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(header_keys, children, max_size=3)
    ),
    max_leaves=8,
)
property_values = st.fixed_dictionaries(
    {},
    optional={
        "delivery_mode": st.integers(-1, 300) | json_scalars,
        "priority": st.integers(-1, 300) | json_scalars,
        "timestamp": st.integers(-1, 2**65) | json_scalars,
        "content_type": json_scalars,
        "expiration": json_scalars,
        "message_id": json_scalars,
        "user_id": json_scalars,
    },
)
records = st.fixed_dictionaries(
    {
        "routing_key": st.text(max_size=4) | st.sampled_from(["r" * 256]) | json_scalars,
        "body": st.sampled_from(["", "e30=", "!!"]) | json_scalars,
    },
    optional={
        "properties": property_values | json_scalars,
        "headers": st.dictionaries(header_keys, header_values, max_size=4) | json_scalars,
    },
)


def encodes(routing_key: str, properties: pika.BasicProperties) -> bool:
    """pika's own verdict: the parked copy's properties, and the routing key
    as a replay publishes it."""
    try:
        parked_properties(properties, routing_key).encode()
        pika.spec.Basic.Publish(exchange="", routing_key=routing_key).encode()
    except Exception:  # any refusal of the encoder counts
        return False
    return True


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(records)
@example({**GOOD, "properties": {"priority": "5"}})
@example({**GOOD, "properties": {"delivery_mode": 300}})
@example({**GOOD, "properties": {"delivery_mode": 3}})
@example({**GOOD, "headers": {"when": {"$datetime": "1969-07-20T20:17:40"}}})
@example({**GOOD, "headers": {"k" * 300: 1}})
@example({**GOOD, "headers": {"a": {"$table": 5}}})
@example({**GOOD, "headers": {"a": [{"b": {"$decimal": "1e100"}}]}})
def test_validation_refuses_exactly_what_cannot_be_encoded(record: dict[str, Any]) -> None:
    text = json.dumps(record)
    try:
        routing_key, properties, _ = from_record(text)
        check_sendable(properties, routing_key)
    except RecordError as exc:
        assert isinstance(exc, ValueError)
        assert exc.field or "JSON" in str(exc)  # the field is named
        try:
            routing_key, properties, _ = from_record(text)
        except RecordError:
            return  # not even a dead letter's form
        # Refused for a reason pika's encoder shares, or one RabbitMQ has
        # (an expiration or, before 4.3, a delivery mode it would close the
        # channel on).
        assert not encodes(routing_key, properties) or exc.field in (
            "properties.expiration",
            "properties.delivery_mode",
        )
        return
    assert encodes(routing_key, properties)


# -- against the broker -----------------------------------------------------------------------


@pytest.fixture
def handler(names: Names) -> str:
    name = names.new("test-import")
    declare_handler(name)
    return name


BAD_LAST_LINES = [
    (line(properties={"priority": "5"}), "properties.priority"),
    (line(properties={"delivery_mode": 300}), "properties.delivery_mode"),
    (line(headers={"when": {"$datetime": "1969-07-20T20:17:40"}}), "headers['when']"),
    (line(headers={"k" * 300: 1}), "headers: the name"),
    (line(headers={"a": {"$table": 5}}), "headers['a']"),
    (line(headers={"a": [1, {"b": {"$decimal": "1e100"}}]}), "headers['a'][1]['b']"),
    (line(headers={"a": 1.5}), "headers['a']"),
    (line(headers={"a": 2**64}), "headers['a']"),
    (line(properties={"expiration": "soon"}), "properties.expiration"),
    (line(routing_key="r" * 256), "routing_key"),
    (line(headers={"big": "a" * 200_000}), "frame_max"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_LAST_LINES)
def test_a_bad_last_line_sends_nothing_and_names_line_and_field(
    handler: str, bad: str, field: str
) -> None:
    file = io.StringIO((line() + "\n") * 250 + bad + "\n")

    with pytest.raises(ValueError, match=r"^line 251: ") as info:
        import_dead_letters(handler, file)

    assert field in str(info.value)
    assert not isinstance(info.value, BrokerError)
    assert queue_size(f"{handler}-dl") == 0


def test_the_command_says_line_field_and_that_nothing_was_imported(
    handler: str, tmp_path: Path
) -> None:
    file = tmp_path / "dead.jsonl"
    file.write_text((line() + "\n") * 250 + line(properties={"priority": "5"}) + "\n")

    result = cli("import", handler, str(file))

    assert result.returncode == 2
    assert "error: error" not in result.stderr
    assert (
        f"{file}: line 251: properties.priority: not a whole number but a string; "
        "nothing was imported"
    ) in result.stderr
    assert queue_size(f"{handler}-dl") == 0


def test_a_send_that_fails_midway_says_how_many_were_put_back(handler: str) -> None:
    # The broker refuses a user_id that is not the connection's user, and
    # closes the channel: only the broker knows, so it is found midway.
    file = io.StringIO((line() + "\n") * 150 + line(properties={"user_id": "not-this-user"}) + "\n")

    with pytest.raises(BrokerError) as info:
        import_dead_letters(handler, file)

    # The refusal may come in with a later publish or the commit: the error
    # names the lines of the transaction the broker refused.
    assert "one of lines 101 to 151" in str(info.value)
    assert "100 dead letter(s) were put back before" in str(info.value)
    assert queue_size(f"{handler}-dl") == 100


def test_a_body_larger_than_the_brokers_limit_is_named() -> None:
    """The broker's max_message_size is known only from its refusal: the
    error names the line whose body is over it (found by the attack: it named
    the transaction's last line)."""
    from domain_event_broker._deadletters.operations import _import_failure

    message = _import_failure("q-dl", 100, [(101, 10), (102, 5000), (103, 10)], 4096)
    assert "line 102: body: 5000 bytes, more than the broker's max_message_size of 4096" in message
    assert "100 dead letter(s) were put back before" in message
    message = _import_failure("q-dl", 0, [(1, 10), (2, 10)], None)
    assert "one of lines 1 to 2" in message


def test_an_unexpected_error_is_named_by_its_qualified_name() -> None:
    # What once read "error: error: required argument is not an integer".
    assert _describe(struct.error("required argument is not an integer")) == (
        "struct.error: required argument is not an integer"
    )
    assert _describe(KeyError("x")) == "KeyError: 'x'"


def test_a_line_nested_too_deeply_is_named() -> None:
    """Found by the attack: a header nested 900 deep ended in a bare RecursionError."""
    nested = "[" * 5000 + "1" + "]" * 5000
    text = '{"routing_key": "a.b", "body": "", "headers": {"deep": ' + nested + "}}"
    with pytest.raises(ValueError, match="line 2: nested too deeply"):
        import_dead_letters("never-declared", io.StringIO(line() + "\n" + text + "\n"))


def test_text_that_was_not_utf8_round_trips_through_an_export() -> None:
    """Found by the attack: a dead letter with a header key that is not UTF-8
    (pika hands it over as bytes) made export raise a bare TypeError. Such
    bytes are kept as escapes, and an import sends the same bytes again."""
    from domain_event_broker._deadletters.letters import DeadLetter, to_record

    properties = pika.BasicProperties(
        app_id=b"app-\xff",
        headers={b"key-\xfe": 1, "nested": {b"\xc3(": b"\x00\xff"}, "plain": "text"},
    )
    letter = DeadLetter("a.b", b"{}", properties, None)
    line = to_record(letter)
    json.loads(line)  # plain JSON
    routing_key, back, body = from_record(line)
    assert (routing_key, body) == ("a.b", b"{}")
    assert back.app_id == b"app-\xff"
    assert back.headers == properties.headers
    check_sendable(back, routing_key)
