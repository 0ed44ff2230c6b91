"""Private RabbitMQ nodes for restart and cluster tests (``scripts/cluster.sh``).

These tests restart, stop and kill -9 nodes, so they never use the shared
default broker: they start their own nodes beside it and stop them
afterwards. ``DEB_TEST_CLUSTER_VERSION`` picks the RabbitMQ version: ``3.10``
(the machine's ``rabbitmq-server``, the default), ``4.0`` or ``4.3`` (Debian's,
in a chroot that ``scripts/cluster.sh`` builds once with debootstrap). The
nodes' names and ports come from ``scripts/cluster.sh nodes VERSION``, the one
table of them.

Locally they skip, with the reason, only when the broker's software is
missing; in CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions
import pytest

from domain_event_broker import DomainEvent, Subscriber

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster.sh"
VERSION = os.environ.get("DEB_TEST_CLUSTER_VERSION", "3.10")


@dataclass(frozen=True)
class NodeSpec:
    """One private node as ``scripts/cluster.sh nodes`` lists it."""

    name: str
    port: int


@functools.cache
def _layout(version: str) -> tuple[dict[str, NodeSpec], str] | str:
    """``version``'s nodes by key (``c1``..``c3``, ``single``) and its chroot
    (``""`` for the machine's broker), from ``scripts/cluster.sh``; or why not."""
    answers = []
    for command in ("nodes", "root"):
        result = subprocess.run(
            [str(SCRIPT), command, version], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return f"DEB_TEST_CLUSTER_VERSION={version!r}: {result.stderr.strip()}"
        answers.append(result.stdout)
    nodes = {}
    for line in answers[0].splitlines():
        key, name, port, _dist = line.split()
        nodes[key] = NodeSpec(name, int(port))
    return nodes, answers[1].strip()


def _nodes(version: str) -> dict[str, NodeSpec]:
    layout = _layout(version)
    assert not isinstance(layout, str), layout
    return layout[0]


#: One line per cluster scenario, printed at the end of the run.
FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the cluster scenarios measured."""
    if FIGURES:
        terminalreporter.section("cluster figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def _missing_software() -> str | None:
    """Why this machine cannot run the nodes, or None."""
    layout = _layout(VERSION)
    if isinstance(layout, str):
        return layout  # an unknown version
    _, chroot = layout
    if not chroot:
        if shutil.which("rabbitmq-server") is None:
            return "rabbitmq-server is not installed (the cluster tests start their own nodes)"
        return None
    chroot_ready = Path(chroot, "usr/lib/rabbitmq/bin/rabbitmq-server").exists()
    can_build = shutil.which("debootstrap") is not None and os.geteuid() == 0
    if not chroot_ready and not can_build:
        return f"no RabbitMQ {VERSION} chroot in {chroot}; building one needs root and debootstrap"
    return None


def _require_software() -> None:
    reason = _missing_software()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def script(*args: str, timeout: float = 300) -> str:
    """Run ``scripts/cluster.sh`` and return its output; fail with it on error."""
    result = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"cluster.sh {' '.join(args)} failed: {result.stdout}{result.stderr}")
    return result.stdout


@dataclass
class Node:
    """One private node: its URL and how to stop, kill and start it."""

    key: str
    version: str = VERSION

    @property
    def port(self) -> int:
        return _nodes(self.version)[self.key].port

    @property
    def name(self) -> str:
        return f"{_nodes(self.version)[self.key].name}@{os.uname().nodename.split('.')[0]}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F?connection_attempts=1"

    def ctl(self, *args: str) -> str:
        return script("ctl", self.version, self.key, *args, timeout=120)

    def start(self) -> None:
        script("start-node", self.version, self.key)

    def stop(self) -> None:
        script("stop-node", self.version, self.key)

    def kill(self) -> None:
        script("kill-node", self.version, self.key)

    def restart(self) -> None:
        self.stop()
        self.start()

    def answers(self) -> bool:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
        except pika.exceptions.AMQPError:
            return False
        connection.close()
        return True

    def queue_messages(self, prefix: str) -> dict[str, int]:
        """Messages per queue whose name starts with ``prefix`` (ready and unacked)."""
        out = self.ctl("-q", "list_queues", "name", "messages", "--no-table-headers")
        sizes: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith(prefix):
                sizes[parts[0]] = int(parts[1])
        return sizes


@pytest.fixture(scope="module")
def restart_node() -> Iterator[Node]:
    """The private single node of this version, started if needed, running after the test."""
    _require_software()
    node = Node("single")
    was_running = node.answers()
    script("single-up", VERSION)
    yield node
    if not was_running:
        script("single-down", VERSION)


@dataclass
class Cluster:
    """Three clustered private nodes."""

    nodes: list[Node] = field(default_factory=lambda: [Node("c1"), Node("c2"), Node("c3")])

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node_named(self, erlang_name: str) -> Node:
        return next(node for node in self.nodes if node.name == erlang_name)

    def leader_of(self, queue: str) -> Node:
        """The node leading (quorum) or hosting (classic) ``queue``."""
        for node in self.nodes:
            if not node.answers():
                continue
            out = node.ctl("-q", "list_queues", "name", "pid", "--no-table-headers")
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == queue:
                    pid = parts[1]
                    for candidate in self.nodes:
                        if candidate.name in pid:
                            return candidate
        raise AssertionError(f"no node hosts {queue}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A three-node cluster of this version, stopped and wiped afterwards."""
    _require_software()
    script("up", VERSION, timeout=600)
    yield Cluster()
    script("down", VERSION, timeout=300)


class Recorder:
    """A handler that counts what it saw, and asks for one retry of some events."""

    def __init__(self, retry_every: int = 0, delay: float = 1.0) -> None:
        self.retry_every = retry_every
        self.delay = delay
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.handled: dict[str, int] = {}
        self.retried: set[str] = set()

    def __call__(self, event: DomainEvent) -> None:
        from domain_event_broker import Retry

        key = event.data["n"]
        with self.lock:
            self.seen[key] = self.seen.get(key, 0) + 1
            first = event.retries == 0
            if first and self.retry_every and int(key) % self.retry_every == 0:
                self.retried.add(key)
                raise Retry(delay=self.delay)
            self.handled[key] = self.handled.get(key, 0) + 1

    def handled_count(self) -> int:
        with self.lock:
            return len(self.handled)


class Worker:
    """A Subscriber consuming in a thread."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cluster-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.subscriber.start_consuming()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> Worker:
        self.thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self.subscriber.stop_consuming()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "start_consuming() did not return after stop"
        if self.error is not None:
            raise AssertionError("start_consuming() raised") from self.error


def wait_until(predicate: object, timeout: float, message: str) -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.1)
