"""Dead letters as values (``domain_event_broker._deadletters.letters``): filters,
topic patterns, ages, summaries and the export format. No broker needed."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_event_broker._deadletters.letters import (
    ORIGINAL_ROUTING_KEY,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterSummary,
    age_bucket,
    from_record,
    logical_view,
    parked_properties,
    parse_age,
    to_record,
    topic_matches,
)

NOW = 1_800_000_000.0

words = st.sampled_from(["a", "b", "user", "order", "x1"])
keys = st.lists(words, min_size=1, max_size=5).map(".".join)
patterns = st.lists(st.one_of(words, st.just("*"), st.just("#")), min_size=1, max_size=5).map(
    ".".join
)


def reference_topic(pattern: str, key: str) -> bool:
    """RabbitMQ's topic matching, by brute force over word assignments."""
    pattern_words, key_words = pattern.split("."), key.split(".")

    def match(p: int, k: int) -> bool:
        if p == len(pattern_words):
            return k == len(key_words)
        word = pattern_words[p]
        if word == "#":
            return any(match(p + 1, j) for j in range(k, len(key_words) + 1))
        if k == len(key_words):
            return False
        return (word in ("*", key_words[k])) and match(p + 1, k + 1)

    return match(0, 0)


@settings(deadline=None)  # a shared, loaded machine: no per-example deadline
@given(patterns, keys)
def test_topic_matches_like_rabbitmq(pattern: str, key: str) -> None:
    assert topic_matches(pattern, key) == reference_topic(pattern, key)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("user.*", "user.registered", True),
        ("user.*", "user.registered.again", False),
        ("user.#", "user", True),
        ("user.#", "user.a.b", True),
        ("#", "anything.at.all", True),
        ("*.registered", "user.registered", True),
        ("#.registered", "registered", True),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.*.b", "a.b", False),
    ],
)
def test_topic_examples(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172800),
        ("1w", 604800),
        ("1.5h", 5400),
        (" 3 H ", 10800),
    ],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "1y", "1h30m", "soon"])
def test_parse_age_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not an age"):
        parse_age(text)


def letter(
    *,
    key: str = "user.registered",
    exception: str | None = "builtins.KeyError",
    handler: str | None = "app.h",
    age: float | None = 100.0,
) -> DeadLetter:
    headers: dict[str, Any] = {}
    if exception is not None:
        headers["x-exception-type"] = exception
    if handler is not None:
        headers["x-failed-handler"] = handler
    if age is not None:
        headers["x-failed-at"] = NOW - age
    return DeadLetter(
        routing_key=key,
        body=b"not an event",
        properties=pika.BasicProperties(headers=headers),
        event=None,
    )


letters = st.builds(
    letter,
    key=keys,
    exception=st.one_of(st.none(), st.sampled_from(["builtins.KeyError", "app.Boom", "KeyError"])),
    handler=st.one_of(st.none(), st.sampled_from(["app.h", "app.g"])),
    age=st.one_of(st.none(), st.floats(min_value=0, max_value=10**6)),
)
filters = st.builds(
    DeadLetterFilter,
    exception=st.lists(
        st.sampled_from(["KeyError", "app.Boom", "Boom", "builtins.KeyError"]), max_size=2
    ),
    handler=st.lists(st.sampled_from(["app.h", "app.g"]), max_size=2),
    routing_key=st.lists(patterns, max_size=2),
    older_than=st.one_of(st.none(), st.floats(min_value=0, max_value=10**6)),
    newer_than=st.one_of(st.none(), st.floats(min_value=0, max_value=10**6)),
)


def reference_match(where: DeadLetterFilter, dead: DeadLetter) -> bool:
    headers = dead.properties.headers or {}
    exception = headers.get("x-exception-type")
    handler = headers.get("x-failed-handler")
    failed_at = headers.get("x-failed-at")
    age = None if failed_at is None else max(0.0, NOW - failed_at)
    checks = []
    if where.exception:
        checks.append(
            exception is not None
            and any(exception.split(".")[-1] == w or exception == w for w in where.exception)
        )
    if where.handler:
        checks.append(handler in where.handler)
    if where.routing_key:
        checks.append(any(reference_topic(p, dead.routing_key) for p in where.routing_key))
    if where.older_than is not None:
        checks.append(age is not None and age >= where.older_than)
    if where.newer_than is not None:
        checks.append(age is not None and age < where.newer_than)
    return all(checks)


@settings(deadline=None)  # a shared, loaded machine: no per-example deadline
@given(filters, letters)
def test_filter_picks_exactly_what_the_reference_picks(
    where: DeadLetterFilter, dead: DeadLetter
) -> None:
    assert where.matches(dead, NOW) == reference_match(where, dead)


def test_filter_without_criteria_matches_everything() -> None:
    assert DeadLetterFilter().matches_everything
    assert DeadLetterFilter().matches(letter(exception=None, handler=None, age=None), NOW)
    assert not DeadLetterFilter(exception="KeyError").matches_everything


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exception": ""},
        {"handler": [1]},
        {"older_than": -1},
        {"newer_than": math.inf},
        {"older_than": True},
        {"routing_key": [""]},
    ],
)
def test_filter_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DeadLetterFilter(**kwargs)


def test_filter_is_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        DeadLetterFilter("KeyError")  # type: ignore[misc]
    where = DeadLetterFilter(exception="KeyError", older_than=3600)
    with pytest.raises(AttributeError):
        where.exception = ()  # type: ignore[misc]
    assert where.describe() == "exception=KeyError, older than 3600s"


# -- summary ---------------------------------------------------------------------------


@settings(deadline=None)  # a shared, loaded machine: no per-example deadline
@given(st.lists(letters, max_size=50))
def test_summary_counts_every_letter_once_per_field(dead_letters: list[DeadLetter]) -> None:
    summary = DeadLetterSummary()
    for dead in dead_letters:
        summary.add(dead, NOW)
    total = len(dead_letters)
    assert summary.total == total
    for counter in (
        summary.by_exception,
        summary.by_handler,
        summary.by_routing_key,
        summary.by_age,
    ):
        assert sum(counter.values()) == total
    ages = [d.age(NOW) for d in dead_letters if d.age(NOW) is not None]
    assert summary.oldest == (max(ages) if ages else None)
    assert summary.newest == (min(ages) if ages else None)
    json.dumps(summary.as_dict())


def test_summary_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from domain_event_broker._deadletters import letters as _deadletters

    monkeypatch.setattr(_deadletters, "MAX_DISTINCT", 3)
    summary = DeadLetterSummary()
    for n in range(10):
        summary.add(letter(key=f"k{n}.x"), NOW)
    assert len(summary.by_routing_key) == 4
    assert summary.by_routing_key["(other)"] == 7


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        (0, "< 1m"),
        (59.9, "< 1m"),
        (60, "1m-10m"),
        (3599, "10m-1h"),
        (86400, "1d-7d"),
        (10**9, ">= 7d"),
    ],
)
def test_age_buckets(age: float, bucket: str) -> None:
    assert age_bucket(age) == bucket


# -- the export format and the moved dead letter -------------------------------------------

header_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False),
        st.text(),
        st.binary(),
        st.decimals(allow_nan=False, allow_infinity=False, places=2),
        st.datetimes(),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(["a", "$bytes", "$table", "b"]), children, max_size=3),
    ),
    max_leaves=10,
)
properties_strategy = st.builds(
    pika.BasicProperties,
    content_type=st.one_of(st.none(), st.just("application/json")),
    delivery_mode=st.one_of(st.none(), st.sampled_from([1, 2])),
    priority=st.one_of(st.none(), st.integers(0, 9)),
    correlation_id=st.one_of(st.none(), st.text(max_size=10)),
    message_id=st.one_of(st.none(), st.text(max_size=10)),
    timestamp=st.one_of(st.none(), st.integers(0, 2**40)),
    headers=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), header_values, max_size=4)),
)


@settings(deadline=None)  # a shared, loaded machine: no per-example deadline
@given(keys, properties_strategy, st.binary())
def test_export_record_round_trips_exactly(
    key: str, properties: pika.BasicProperties, body: bytes
) -> None:
    dead = DeadLetter(routing_key=key, body=body, properties=properties, event=None)
    line = to_record(dead)
    assert "\n" not in line
    routing_key, back, body_back = from_record(line)
    assert (routing_key, body_back) == (key, body)
    assert vars(back) == vars(properties)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "[]",
        "{}",
        '{"routing_key": 1, "body": ""}',
        '{"routing_key": "a", "body": "***"}',
        '{"routing_key": "a", "body": "", "properties": {"colour": "red"}}',
    ],
)
def test_a_bad_export_line_is_refused(line: str) -> None:
    with pytest.raises(ValueError):
        from_record(line)


def test_a_moved_dead_letter_shows_its_own_routing_key_and_headers() -> None:
    properties = pika.BasicProperties(
        delivery_mode=2,
        headers={
            "tenant": "acme",
            "when": datetime(2026, 1, 1, tzinfo=timezone.utc).replace(tzinfo=None),
            "amount": Decimal("1.50"),
        },
    )
    moved = parked_properties(properties, "user.registered")
    assert moved.headers[ORIGINAL_ROUTING_KEY] == "user.registered"
    moved.headers["x-delivery-count"] = 3  # what a quorum queue adds
    key, seen = logical_view("name-dl", moved)
    assert key == "user.registered"
    assert vars(seen) == vars(properties)
    # Untouched dead letters are seen as they are.
    assert logical_view("user.registered", properties) == ("user.registered", properties)
