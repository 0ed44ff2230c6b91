"""pytest fixtures for testing code that publishes and handles domain events.

Loaded automatically when domain-event-broker is installed (a ``pytest11``
entry point); ``-p no:domain_event_broker`` turns it off.

Fixtures:

- ``captured_events``: the list :func:`~domain_event_broker.testing.capture_events`
  records into, for the whole test;
- ``stub_broker``: an active :class:`~domain_event_broker.testing.StubBroker`.

.. versionadded:: 4.1
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .events import DomainEvent
from .testing import StubBroker, capture_events


@pytest.fixture
def captured_events() -> Iterator[list[DomainEvent]]:
    """Events published during the test, recorded instead of sent."""
    with capture_events() as events:
        yield events


@pytest.fixture
def stub_broker() -> Iterator[StubBroker]:
    """A broker-free stand-in that runs registered handlers in memory."""
    with StubBroker() as broker:
        yield broker
