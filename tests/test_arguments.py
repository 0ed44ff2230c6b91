"""The command-line argument types every command shares."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain_event_broker._cli import arguments as _arguments


@given(st.text(max_size=12))
def test_any_text_gives_a_value_or_an_argument_error(text: str) -> None:
    for parse in (
        _arguments.positive_int,
        _arguments.non_negative_int,
        _arguments.port,
        _arguments.positive_seconds,
        _arguments.non_negative_seconds,
    ):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as exc:
            assert str(exc)
        else:
            assert value >= 0
            assert math.isfinite(value)


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (_arguments.positive_int, "0", "must be at least 1"),
        (_arguments.non_negative_int, "-1", "must not be negative"),
        (_arguments.port, "65536", "must be at most 65535"),
        (_arguments.positive_seconds, "0", "must be a positive number of seconds"),
        (_arguments.positive_seconds, "nan", "must be a positive number of seconds"),
        (_arguments.non_negative_seconds, "-0.5", "must be a non-negative number of seconds"),
        (_arguments.non_negative_seconds, "soon", "not a number of seconds: 'soon'"),
    ],
)
def test_messages_say_what_was_expected(parse: object, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)  # type: ignore[operator]


def test_good_values() -> None:
    assert _arguments.positive_int("3") == 3
    assert _arguments.port("5672") == 5672
    assert _arguments.non_negative_seconds("0") == 0.0
    assert _arguments.positive_seconds("1.5") == 1.5
