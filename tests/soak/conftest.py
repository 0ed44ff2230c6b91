"""The soak run: only with ``-m soak`` (``make soak``), never in ``make test``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from ..faults.conftest import NODE_VARIABLE
from ..faults.conftest import names as names  # the fast clean-up, without rabbitmqctl
from ..faults.control import REPORTS, RabbitControl


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="soak run: select it with -m soak (make soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rabbitmq(broker_url: str) -> Iterator[RabbitControl]:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("the soak run needs rabbitmqctl")
    control = RabbitControl(os.environ.get(NODE_VARIABLE) or None, broker_url)
    yield control
    control.restore()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    soak = [line for line in REPORTS if line.startswith("soak")]
    if soak:
        terminalreporter.section("soak figures")
        for line in soak:
            terminalreporter.write_line(line)
