"""Fault injection into the running broker, always undone afterwards.

The broker is controlled with ``rabbitmqctl``. Which node:
``DEB_TEST_RABBITMQ_NODE`` (e.g. ``faults@localhost`` for a private
development node), else the local default node. Which URL: the usual
``DOMAIN_EVENT_BROKER`` (see ``tests/helpers.py``); both must name the same
broker. In CI (one broker, tests run sequentially) both are left unset.
``DEB_TEST_RABBITMQCTL`` replaces the ``rabbitmqctl`` command, e.g. with
``docker compose exec -T rabbitmq rabbitmqctl`` for the compose broker.
``DEB_TEST_SKIP_FAULTS=1`` skips them all, for a broker other people use.

Every test that uses :func:`rabbitmq` leaves the broker as it found it: the
teardown always starts the app, clears the memory alarm and restores any
setting a test changed, in one ``rabbitmqctl eval``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from domain_event_broker import Subscriber

from .. import helpers
from ..conftest import Names
from ..helpers import rabbitmqctl_command, raw_connection
from .control import REPORTS, RabbitControl, RunningSubscriber
from .proxy import TcpProxy

NODE_VARIABLE = helpers.NODE_VARIABLE
#: Set to skip every fault test (a broker shared with other people).
SKIP_VARIABLE = "DEB_TEST_SKIP_FAULTS"
#: How to run rabbitmqctl, e.g. ``docker compose exec -T rabbitmq rabbitmqctl``.
COMMAND_VARIABLE = helpers.RABBITMQCTL_VARIABLE


def rabbit_control(broker_url: str) -> RabbitControl:
    """Control of the node given by the environment (see the module docstring)."""
    command = rabbitmqctl_command(with_node=False)
    return RabbitControl(os.environ.get(NODE_VARIABLE) or None, broker_url, command)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``DEB_TEST_SKIP_FAULTS=1``: leave a shared development broker alone."""
    if not os.environ.get(SKIP_VARIABLE):
        return
    skip = pytest.mark.skip(reason=f"{SKIP_VARIABLE} is set: no fault injection")
    for item in items:
        if "faults" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _rabbitmqctl(broker_url: str) -> RabbitControl:
    control = rabbit_control(broker_url)
    if shutil.which(control.command[0]) is None:
        message = f"the fault tests need {control.command[0]} (or set {COMMAND_VARIABLE})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        control.eval("ok.")
    except RuntimeError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"rabbitmqctl cannot reach the node: {exc}")
        pytest.skip(f"rabbitmqctl cannot reach the node: {exc}")
    return control


@pytest.fixture
def names(broker_url: str) -> Iterator[Names]:
    """Unique handler names; their queues and exchanges are deleted afterwards.

    Overrides the suite's fixture to skip its slow ``rabbitmqctl`` look-up of
    delay queues (fault tests declare none). :func:`rabbitmq` depends on it,
    so the broker is restored before this clean-up runs.
    """
    registry = Names()
    yield registry
    connection = raw_connection()
    try:
        channel = connection.channel()
        for name in registry.queues:
            for queue in (name, f"{name}-dl"):
                channel.queue_delete(queue)
            for exchange in (
                f"{name}-retry",
                f"{name}-dlx",
                f"{name}-retry-durable",
                f"{name}-dlx-durable",
            ):
                channel.exchange_delete(exchange)
    finally:
        connection.close()


@pytest.fixture
def rabbitmq(_rabbitmqctl: RabbitControl, names: Names) -> Iterator[RabbitControl]:
    """Control over the test broker; whatever the test did is undone after it."""
    yield _rabbitmqctl
    _rabbitmqctl.restore()


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy to the test broker, to cut or freeze the wire."""
    with TcpProxy.for_url(broker_url) as tcp_proxy:
        yield tcp_proxy


@pytest.fixture
def run_subscriber() -> Iterator[Any]:
    """Start consuming in a thread: ``run_subscriber(subscriber)``; stopped after the test."""
    running: list[RunningSubscriber] = []

    def start(subscriber: Subscriber) -> RunningSubscriber:
        runner = RunningSubscriber(subscriber).start()
        running.append(runner)
        return runner

    yield start
    for runner in running:
        if not runner.returned.is_set():
            runner.subscriber.stop_consuming()
            runner.thread.join(30)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORTS:
        terminalreporter.section("fault injection counts")
        for line in REPORTS:
            terminalreporter.write_line(line)
