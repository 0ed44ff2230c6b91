"""Helpers for the Django tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..helpers import get_messages, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]

#: An AMQP URL where nothing listens: connections are refused at once.
DEAD_BROKER_URL = "amqp://guest:guest@127.0.0.1:1/%2F"


def manage_command(*args: str) -> list[str]:
    """The command line running ``django-admin`` with the test settings."""
    return [sys.executable, "-m", "django", *args]


class EventQueue:
    """A queue bound to ``domain-events`` with a binding key unique to one test."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix

    def key(self, event_type: str = "happened") -> str:
        """A routing key this queue receives."""
        return f"{self.prefix}.{event_type}"

    def take(self) -> list[dict[str, Any]]:
        """Take every message waiting in the queue, as decoded JSON bodies."""
        return [json.loads(body) for _, _, body in get_messages(self.name)]

    def take_until(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Take messages until at least ``count`` arrived, or fail after ``timeout``."""
        received: list[dict[str, Any]] = []

        def enough() -> bool:
            received.extend(self.take())
            return len(received) >= count

        wait_for(enough, timeout=timeout, interval=0.05, message=f"{count} events in {self.name}")
        return received


class LimitedQueue(EventQueue):
    """A queue that holds at most ``max_length`` messages and makes the broker
    refuse (nack) further publishes to it (``x-overflow: reject-publish``)."""

    def __init__(self, name: str, prefix: str, max_length: int) -> None:
        super().__init__(name, prefix)
        self.max_length = max_length
