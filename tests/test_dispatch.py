"""The dispatch policy, without a broker: one delivery in, one outcome out."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pika
import pika.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import DomainEvent, Retry
from domain_event_broker._subscribing.dispatch import (
    UNPRINTABLE,
    Action,
    Delivery,
    Outcome,
    dispatch,
)
from domain_event_broker._subscribing.registration import (
    MAX_RETRY_DELAY,
    Registration,
    build_registration,
)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

GOOD_BODY = json.dumps(
    {
        "routing_key": "user.registered",
        "data": {"id": 1},
        "domain_object_id": None,
        "uuid_string": "0b7f6e7e-3b57-4d38-9d6b-0a5c1f1d1a11",
        "timestamp": 1.0,
    }
).encode()


def registration(handler: Any, *, dead_letter: bool = True, max_retries: int = 3) -> Registration:
    return build_registration(
        handler, "dispatch-test", ["#"], dead_letter=dead_letter, max_retries=max_retries
    )


def delivery(
    handler: Any,
    body: bytes = GOOD_BODY,
    headers: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Delivery:
    return Delivery(
        registration=registration(handler, **kwargs),
        delivery_tag=1,
        routing_key="user.registered",
        body=body,
        properties=pika.BasicProperties(headers=headers),
    )


def assert_well_formed(outcome: Outcome) -> None:
    """Every outcome is one of the three, and its headers can go on the wire."""
    assert outcome.action in (Action.ACK, Action.DISCARD, Action.RETRY, Action.DEAD_LETTER)
    pika.data.encode_table([], outcome.headers)  # raises if AMQP cannot carry them
    if outcome.action is Action.DEAD_LETTER:
        for key in ("x-exception-type", "x-exception-message", "x-failed-handler"):
            assert isinstance(outcome.headers[key], str)
    if outcome.action is Action.RETRY:
        assert 0 <= outcome.delay_ms <= MAX_RETRY_DELAY * 1000


def test_a_handler_that_returns_is_acknowledged() -> None:
    seen: list[DomainEvent] = []
    outcome = dispatch(delivery(seen.append))
    assert outcome.action is Action.ACK
    assert seen[0].routing_key == "user.registered"
    assert seen[0].retries == 0


def test_retry_counts_from_the_header() -> None:
    seen: list[int] = []

    def handler(event: DomainEvent) -> None:
        seen.append(event.retries)
        raise Retry(2.5)

    outcome = dispatch(delivery(handler, headers={"x-retry-count": 2}))
    assert seen == [2]
    assert outcome.action is Action.RETRY
    assert outcome.delay_ms == 2500
    assert outcome.headers == {"x-retry-count": 3}


def test_retry_past_max_retries_is_dead_lettered() -> None:
    def handler(event: DomainEvent) -> None:
        raise Retry(1)

    outcome = dispatch(delivery(handler, headers={"x-retry-count": 3}))
    assert outcome.action is Action.DEAD_LETTER
    assert "max_retries=3" in outcome.headers["x-exception-message"]
    assert outcome.headers["x-exception-type"] == "domain_event_broker.subscribe.Retry"


@pytest.mark.parametrize("delay", [math.inf, -math.inf, math.nan, -1, MAX_RETRY_DELAY + 1, 2**64])
def test_retry_refuses_delays_a_queue_cannot_take(delay: float) -> None:
    with pytest.raises(ValueError, match="Retry delay"):
        Retry(delay)


@pytest.mark.parametrize("delay", [math.inf, 2**40, math.nan])
def test_an_impossible_delay_in_a_handler_is_dead_lettered(delay: float) -> None:
    def handler(event: DomainEvent) -> None:
        raise Retry(delay)

    outcome = dispatch(delivery(handler))
    assert outcome.action is Action.DEAD_LETTER
    assert outcome.headers["x-exception-type"] == "ValueError"
    assert "Retry delay" in outcome.headers["x-exception-message"]


def test_a_retry_whose_delay_was_changed_afterwards_is_dead_lettered() -> None:
    def handler(event: DomainEvent) -> None:
        request = Retry(1)
        request.delay = math.inf
        raise request

    outcome = dispatch(delivery(handler))
    assert outcome.action is Action.DEAD_LETTER
    assert "Retry delay" in outcome.headers["x-exception-message"]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class NotAString(Exception):
    def __str__(self) -> Any:
        return 42  # noqa: PLE0307  # the point of the test


def test_exception_text_that_cannot_be_produced_gets_a_placeholder() -> None:
    def handler(event: DomainEvent) -> None:
        raise Unprintable

    outcome = dispatch(delivery(handler))
    assert outcome.action is Action.DEAD_LETTER
    assert outcome.headers["x-exception-message"] == UNPRINTABLE
    assert outcome.headers["x-exception-type"].endswith("Unprintable")
    assert_well_formed(outcome)


def test_exception_text_that_cannot_be_encoded_is_escaped() -> None:
    def handler(event: DomainEvent) -> None:
        raise ValueError("lone surrogate \udc80 here")

    outcome = dispatch(delivery(handler))
    assert outcome.action is Action.DEAD_LETTER
    assert "\\udc80" in outcome.headers["x-exception-message"]
    assert_well_formed(outcome)


def test_a_deeply_nested_body_is_malformed_not_fatal() -> None:
    called: list[DomainEvent] = []
    body = b"[" * 100_000 + b"]" * 100_000
    outcome = dispatch(delivery(called.append, body=body))
    assert outcome.action is Action.DEAD_LETTER
    assert outcome.headers["x-exception-type"] == "domain_event_broker.errors.MalformedEventError"
    assert not called


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_system_exit_and_friends_stop_and_keep_the_event(error: BaseException) -> None:
    def handler(event: DomainEvent) -> None:
        raise error

    outcome = dispatch(delivery(handler))
    assert outcome.action is Action.STOP
    assert outcome.error is error


def test_failure_without_dead_letter_is_acknowledged_with_an_error_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handler(event: DomainEvent) -> None:
        raise KeyError("gone")

    with caplog.at_level(logging.ERROR):
        outcome = dispatch(delivery(handler, dead_letter=False))
    assert outcome.action is Action.DISCARD
    assert "discarded (no dead-letter queue)" in caplog.text


def test_odd_retry_count_headers_count_as_zero() -> None:
    seen: list[int] = []
    for value in ["3", -1, True, 2.5, None, [1]]:
        dispatch(
            delivery(lambda event: seen.append(event.retries), headers={"x-retry-count": value})
        )
    assert seen == [0] * 6


# -- properties ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=10,
)

bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"routing_key": st.text(max_size=20)},
        optional={
            "data": json_values,
            "domain_object_id": json_values,
            "uuid_string": json_values,
            "timestamp": json_values,
            "retries": json_values,
            "extra": json_values,
        },
    ).map(lambda value: json.dumps(value).encode()),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.just(GOOD_BODY),
)

header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(0, 10), max_size=3),
)

headers = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["x-retry-count", "x-death", "other"]), header_values),
)


class OddText(Exception):
    def __init__(self, text: Any) -> None:
        super().__init__()
        self.text = text

    def __str__(self) -> Any:
        return self.text


def behaviours() -> st.SearchStrategy[Any]:
    def returns(value: Any) -> Any:
        return lambda event: value

    def raises(error: BaseException) -> Any:
        def handler(event: DomainEvent) -> None:
            raise error

        return handler

    def retries(delay: Any) -> Any:
        def handler(event: DomainEvent) -> None:
            raise Retry(delay)

        return handler

    odd_texts = st.one_of(
        st.text(),
        st.text(alphabet=st.characters(categories=["Cs"]), min_size=1),
        st.integers(),
        st.none(),
        st.binary(),
    )
    errors = st.one_of(
        st.sampled_from(
            [ValueError("x"), KeyError(1), RuntimeError(), Unprintable(), NotAString(), Retry()]
        ),
        odd_texts.map(OddText),
        st.text().map(Exception),
    )
    delays = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**70), 2**70),
        st.text(max_size=3),
        st.none(),
    )
    return st.one_of(
        st.builds(returns, json_values),
        errors.map(raises),
        delays.map(retries),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=bodies,
    headers=headers,
    behaviour=behaviours(),
    dead_letter=st.booleans(),
    max_retries=st.integers(0, 5),
)
def test_every_delivery_ends_in_one_well_formed_outcome(
    body: bytes, headers: dict[str, Any] | None, behaviour: Any, dead_letter: bool, max_retries: int
) -> None:
    logging.disable(logging.CRITICAL)  # hundreds of ERROR lines otherwise
    try:
        outcome = dispatch(
            delivery(
                behaviour,
                body=body,
                headers=headers,
                dead_letter=dead_letter,
                max_retries=max_retries,
            )
        )
    finally:
        logging.disable(logging.NOTSET)
    assert outcome.action is not Action.STOP
    assert_well_formed(outcome)
    if not dead_letter:
        assert outcome.action in (Action.ACK, Action.DISCARD, Action.RETRY)
