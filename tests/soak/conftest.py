"""The soak run: only with ``-m soak`` (``make soak``), never in ``make test``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from ..faults.conftest import names as names  # the fast clean-up, without rabbitmqctl
from ..faults.conftest import rabbit_control
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
    control = rabbit_control(broker_url)
    if shutil.which(control.command[0]) is None:
        pytest.skip(f"the soak run needs {control.command[0]}")
    yield control
    control.restore()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    soak = [line for line in REPORTS if line.startswith("soak")]
    if soak:
        terminalreporter.section("soak figures")
        for line in soak:
            terminalreporter.write_line(line)
