"""Command-line argument types, shared by every command of the package.

Each turns a string into a value or raises ``argparse.ArgumentTypeError``
with a message that says what was expected.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["non_negative_int", "non_negative_seconds", "port", "positive_int", "positive_seconds"]


def _whole_number(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        if minimum == 0:
            raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {value}")
    return value


def _number_of_seconds(text: str, *, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise argparse.ArgumentTypeError(f"must be a {kind} number of seconds, not {text}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    return _whole_number(text, 0)


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    return _whole_number(text, 1, 65535)


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    return _number_of_seconds(text, positive=True)


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds >= 0."""
    return _number_of_seconds(text, positive=False)
