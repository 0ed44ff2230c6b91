"""``domain-event-broker worker`` and ``health`` (issue 13), in subprocesses,
against the real broker.

Workers run ``tests.worker_app:make_subscriber``. The shared broker is never
stopped: the unreachable-broker test goes through a TCP proxy of its own,
which it closes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pika.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_event_broker import publish_domain_event
from domain_event_broker._worker.runner import (
    EXIT_CONFIGURATION,
    MAX_RESTART_BACKOFF,
    RESTART_BACKOFF,
    STABLE_AFTER,
    Supervisor,
    WorkerOptions,
    check_health,
)

from .helpers import BROKER_URL, consumer_count, queue_size, rabbitmqctl_command, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = "tests.worker_app:make_subscriber"

pytestmark = pytest.mark.slow


class Worker:
    """One ``worker`` command line running in a subprocess."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, state: Path) -> None:
        self.process = process
        self.log = log
        self.state = state

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def handled(self) -> list[str]:
        return sorted(path.name for path in self.state.glob("handled-*"))

    def child_pids(self) -> dict[int, int]:
        """The latest pid of each child of a supervisor, from its log."""
        return {
            int(index): int(pid)
            for index, pid in re.findall(r"Started worker (\d+) \(pid (\d+)\)", self.text())
        }


@pytest.fixture
def start_worker(names, tmp_path: Path) -> Iterator:
    name = names.new("worker")
    key = f"{name}.happened"
    state = tmp_path / "state"
    state.mkdir()
    workers: list[Worker] = []

    def start(
        *options: str,
        command: list[str] | None = None,
        url: str = BROKER_URL,
        env: dict[str, str] | None = None,
    ) -> Worker:
        log = tmp_path / f"worker-{len(workers)}.log"
        environment = {
            **os.environ,
            **(env or {}),
            "DEB_TEST_WORKER_NAME": name,
            "DEB_TEST_WORKER_KEY": key,
            "DEB_TEST_WORKER_STATE": str(state),
            "DOMAIN_EVENT_BROKER": url,
            "PYTHONPATH": str(REPO_ROOT),
        }
        argv = command or [sys.executable, "-m", "domain_event_broker", "worker", APP]
        with log.open("wb") as stream:
            process = subprocess.Popen(
                [*argv, *options], cwd=REPO_ROOT, env=environment, stdout=stream, stderr=stream
            )
        worker = Worker(process, log, state)
        workers.append(worker)
        return worker

    start.name = name  # type: ignore[attr-defined]
    start.key = key  # type: ignore[attr-defined]
    start.state = state  # type: ignore[attr-defined]
    yield start
    for worker in workers:  # only the processes this test started
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(10)


def health(path: Path, max_age: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "domain_event_broker",
            "health",
            "--file",
            str(path),
            "--max-age",
            str(max_age),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_processes_share_a_queue_and_sigterm_drains_them_all(start_worker, tmp_path: Path) -> None:
    health_file = tmp_path / "health"
    worker = start_worker(
        "--processes", "2", "--health-file", str(health_file), "--health-interval", "0.2"
    )
    wait_for(lambda: consumer_count(start_worker.name) == 2, timeout=30, message="two consumers")
    wait_for(lambda: health(health_file, 5).returncode == 0, timeout=15, message="healthy")

    uuids = [publish_domain_event(start_worker.key, {"sleep": 0.5}).uuid_string for _ in range(6)]
    wait_for(
        lambda: len(list(worker.state.glob("started-*"))) >= 2,
        timeout=15,
        message="both busy",
    )
    assert worker.stop() == 0, worker.text()

    started = {path.name.removeprefix("started-") for path in worker.state.glob("started-*")}
    handled = worker.handled()
    # Every event a handler started was finished (drained), in two processes.
    assert started <= set(uuids)
    assert {name.removeprefix("handled-").rsplit("-", 1)[0] for name in handled} == started
    assert len({name.rsplit("-", 1)[1] for name in handled}) == 2, handled  # two pids
    assert not health_file.exists()
    assert not list(tmp_path.glob("health.*"))


def test_a_crashed_child_is_restarted(start_worker) -> None:
    worker = start_worker("--processes", "2")
    wait_for(lambda: consumer_count(start_worker.name) == 2, timeout=30, message="two consumers")
    crash = publish_domain_event(start_worker.key, {"crash": True}).uuid_string
    wait_for(lambda: (worker.state / "crashed").exists(), timeout=15, message="a crash")
    # The event comes back (it was never acknowledged) and is handled.
    wait_for(lambda: any(crash in name for name in worker.handled()), timeout=30, message="handled")
    wait_for(lambda: consumer_count(start_worker.name) == 2, timeout=30, message="restarted")
    assert "restarting in" in worker.text()
    assert worker.stop() == 0, worker.text()


def test_a_child_failing_for_good_stops_all_and_exits_non_zero(start_worker) -> None:
    worker = start_worker("--processes", "2", "--max-restarts", "1")
    wait_for(lambda: consumer_count(start_worker.name) == 2, timeout=30, message="two consumers")
    # Every attempt crashes: the event is redelivered each time.
    publish_domain_event(start_worker.key, {"crash": True, "always": True})
    status = worker.process.wait(60)
    assert status == 1, worker.text()
    assert "giving up" in worker.text()


def test_a_sigterm_while_a_restarted_child_starts_is_a_graceful_stop(start_worker) -> None:
    """Issue 23 item 12: the supervisor's SIGTERM reaches a restarted child
    before it installed its handler. It used to kill it (exit 1); the child
    now stops before consuming, and the supervisor exits 0."""
    worker = start_worker("--processes", "2")
    wait_for(lambda: consumer_count(start_worker.name) == 2, timeout=30, message="two consumers")
    event = publish_domain_event(start_worker.key, {}).uuid_string
    wait_for(lambda: any(event in name for name in worker.handled()), timeout=15, message="handled")
    uuids = {publish_domain_event(start_worker.key, {"sleep": 0.2}).uuid_string for _ in range(20)}
    first = worker.child_pids()[1]
    (worker.state / "slow-start").write_text("30")  # the next child takes its time to start
    os.kill(first, signal.SIGKILL)
    starting = wait_for(
        lambda: [p for p in worker.state.glob("starting-*") if p.name != f"starting-{first}"],
        timeout=30,
        message="the restarted child starting",
    )
    restarted = int(starting[0].name.removeprefix("starting-"))
    assert worker.child_pids()[1] == restarted
    assert worker.stop() == 0, worker.text()
    # It was started with the stop signals blocked, and stopped itself.
    assert f"Worker {restarted} received signal 15 while starting" in worker.text()
    # Nothing lost: each event was handled, or is back in the queue.
    handled = {name.removeprefix("handled-").rsplit("-", 1)[0] for name in worker.handled()}
    wait_for(lambda: consumer_count(start_worker.name) == 0, timeout=15, message="no consumer")
    assert (queue_size(start_worker.name) or 0) >= len(uuids - handled)


def test_a_sigterm_while_the_worker_starts_is_a_graceful_stop(start_worker) -> None:
    """Issue 23 item 12, without a supervisor: SIGTERM before the subscriber
    consumes ends the start, exit 0."""
    state = start_worker.state
    (state / "slow-start").write_text("30")
    worker = start_worker()
    wait_for(lambda: list(state.glob("starting-*")), timeout=30, message="the worker starting")
    assert worker.stop() == 0, worker.text()
    assert "while starting; stopped before consuming" in worker.text()


def _free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on 127.0.0.1."""
    for _ in range(100):
        port = free_port()
        with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", port + 1)):
            return port
    raise AssertionError("no two free ports in a row")


def test_a_child_with_a_configuration_error_stops_all_at_once(start_worker) -> None:
    """Issue 23 item 13: child 1's metrics port is taken: no restart, one
    message, exit 2, at once."""
    port = _free_port_pair()
    with socket.create_server(("127.0.0.1", port + 1)):  # child 1's port, taken
        started = time.monotonic()
        worker = start_worker(
            "--processes", "2", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"
        )
        try:
            status = worker.process.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after 30s:\n{worker.text()}")
        elapsed = time.monotonic() - started
    text = worker.text()
    assert status == EXIT_CONFIGURATION == 2, text
    assert elapsed < 20, text
    assert text.count(f"cannot serve metrics on 127.0.0.1:{port + 1}") == 1, text
    assert "restarting in" not in text
    assert "usage:" not in text
    assert "a configuration error" in text
    wait_for(lambda: consumer_count(start_worker.name) == 0, timeout=15, message="no consumer")


def _connection_names() -> str:
    """Every connection's client properties on the test broker's node."""
    try:
        result = subprocess.run(
            [*rabbitmqctl_command(), "-q", "list_connections", "client_properties"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        message = f"rabbitmqctl is needed to list the connections: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return result.stdout


def test_the_supervisor_holds_no_broker_connection(start_worker) -> None:
    """Issue 23 item 14: the supervisor loads the subscriber to check it, and
    closes its connection; only the children are connected (each connection
    is named with its process id)."""
    worker = start_worker("--processes", "2")
    wait_for(lambda: consumer_count(start_worker.name) == 2, timeout=30, message="two consumers")
    children = worker.child_pids()
    assert len(children) == 2
    listing = wait_for(
        lambda: (
            (names := _connection_names())
            and all(f"(pid {pid})" in names for pid in children.values())
            and names
        ),
        timeout=15,
        message="the children's connections listed",
    )
    assert f"(pid {worker.process.pid})" not in listing, listing
    assert worker.stop() == 0, worker.text()


# -- health --------------------------------------------------------------------------


class Proxy:
    """A TCP proxy to the shared broker that can be cut, to make the broker
    unreachable for one worker only."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):  # wakes up accept() (close alone does not)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_health_turns_unhealthy_when_the_broker_is_unreachable(
    start_worker, tmp_path: Path
) -> None:
    broker = pika.URLParameters(BROKER_URL)
    proxy = Proxy((broker.host, broker.port))
    health_file = tmp_path / "health"
    worker = start_worker(
        "--health-file",
        str(health_file),
        "--health-interval",
        "0.2",
        url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F?connection_attempts=1",
    )
    wait_for(lambda: health(health_file, 2).returncode == 0, timeout=30, message="healthy")
    proxy.cut()  # the broker is now unreachable for this worker only
    result = wait_for(
        lambda: (r := health(health_file, 2)).returncode == 1 and r,
        timeout=30,
        message="unhealthy",
    )
    assert "unhealthy" in result.stdout
    assert worker.process.poll() is None  # still running, reconnecting
    assert worker.stop() == 0, worker.text()


def test_health_is_unhealthy_without_a_file(tmp_path: Path) -> None:
    result = health(tmp_path / "missing", 5)
    assert result.returncode == 1
    assert "does not exist" in result.stdout
    stale = tmp_path / "stale"
    stale.touch()
    os.utime(stale, (time.time() - 100, time.time() - 100))
    assert health(stale, 5).returncode == 1
    assert health(stale, 500).returncode == 0


# -- metrics, logs, usage ---------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def test_metrics_port_serves_prometheus_text_and_logs_are_json(start_worker) -> None:
    port = free_port()
    worker = start_worker(
        "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--log-format", "json"
    )
    wait_for(lambda: consumer_count(start_worker.name) == 1, timeout=30, message="a consumer")
    publish_domain_event(start_worker.key, {"publish": f"{start_worker.name}.followup"})
    wait_for(worker.handled, timeout=15, message="handled")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = wait_for(
        lambda: next((body for body in [scrape()] if "events_published" in body), ""),
        timeout=15,
        message="the published counter",
    )
    assert 'outcome="confirmed"' in text
    assert worker.stop() == 0
    assert '"event_uuid": null' in worker.text()  # JSON lines with the event fields


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.worker_app:not_a_subscriber", "not a Subscriber"),
        ("tests.no_such_module:x", "cannot import"),
        ("tests.worker_app:missing", "no attribute"),
        ("no-colon", "MODULE:ATTRIBUTE"),
    ],
)
def test_a_wrong_target_is_a_usage_error(spec: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "domain_event_broker", "worker", spec],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_the_django_management_command_exits_2_on_a_wrong_target() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "run_domain_event_worker",
            "tests.worker_app:not_a_subscriber",
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.django.settings"},
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_CONFIGURATION, result.stderr
    assert "not a Subscriber" in result.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_the_django_management_command(start_worker, processes: int) -> None:
    worker = start_worker(
        "--processes",
        str(processes),
        command=[sys.executable, "-m", "django", "run_domain_event_worker", APP],
        env={"DJANGO_SETTINGS_MODULE": "tests.django.settings"},
    )
    wait_for(
        lambda: consumer_count(start_worker.name) == processes, timeout=30, message="consumers"
    )
    event = publish_domain_event(start_worker.key, {})
    wait_for(
        lambda: any(event.uuid_string in name for name in worker.handled()),
        timeout=15,
        message="handled",
    )
    assert worker.stop() == 0, worker.text()


@settings(max_examples=50, deadline=None)
@given(age=st.floats(0, 10_000), max_age=st.floats(0.5, 10_000))
def test_check_health_compares_the_files_age_with_the_limit(
    tmp_path_factory: pytest.TempPathFactory, age: float, max_age: float
) -> None:
    path = tmp_path_factory.mktemp("health") / "file"
    path.touch()
    modified = time.time() - age
    os.utime(path, (modified, modified))
    healthy, text = check_health(path, max_age)
    if abs(age - max_age) > 1:  # the clock moves between utime and the check
        assert healthy == (age <= max_age), text
    assert text.startswith("healthy" if healthy else "unhealthy")


class _Exited:
    """A child process that has exited with ``code``."""

    pid = 0
    stdin = None

    def __init__(self, code: int) -> None:
        self.code = code

    def poll(self) -> int:
        return self.code

    def wait(self) -> int:
        return self.code


def test_a_failing_child_is_restarted_after_pauses_doubling_to_the_longest() -> None:
    supervisor = Supervisor(WorkerOptions(APP, processes=2, max_restarts=9), ["unused"])
    child = supervisor.children[0]

    def fail(ran_for: float) -> float:
        child.process = _Exited(1)  # type: ignore[assignment]
        child.started = time.monotonic() - ran_for
        supervisor._check(child)
        assert child.restart_at is not None
        return round(child.restart_at - time.monotonic())

    pauses = [fail(0) for _ in range(7)]
    assert pauses == [1, 2, 4, 8, 16, 30, 30]
    assert (RESTART_BACKOFF, MAX_RESTART_BACKOFF) == (1, 30)
    # A child that ran STABLE_AFTER before failing starts a new series.
    assert [fail(STABLE_AFTER), fail(0)] == [1, 2]
    assert child.failures == 2


@settings(max_examples=200, deadline=None)
@given(
    code=st.sampled_from([0, 1, 2, 3, 143, -signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT])
    | st.integers(-64, 255),
    stopping=st.booleans(),
    signalled=st.booleans(),
)
def test_which_exit_statuses_restart_a_child(code: int, stopping: bool, signalled: bool) -> None:
    """A child is restarted unless it stopped cleanly (0, or ended by the
    supervisor's own SIGTERM), had a configuration error (2), or the
    supervisor is stopping; a configuration error stops all with exit 2. A
    child that ended before the stop reached it counts as stopped."""
    signalled = signalled and stopping  # the supervisor signals only when stopping
    supervisor = Supervisor(WorkerOptions(APP, processes=2, max_restarts=9), ["unused"])
    supervisor._stopping = stopping
    child = supervisor.children[0]
    child.process = _Exited(code)  # type: ignore[assignment]
    child.signalled = signalled
    child.started = time.monotonic()
    supervisor._check(child)
    clean = code == 0 or (code == -signal.SIGTERM and signalled)
    # Ended before the stop reached it (not signalled): it would have been
    # restarted, and a stop was asked for (found by the attack: exit 1).
    before_the_stop = stopping and not signalled and code != EXIT_CONFIGURATION
    restarted = child.restart_at is not None
    assert restarted == (not stopping and not clean and code != EXIT_CONFIGURATION)
    assert child.done == (not restarted)
    assert (child.returncode == 0) == (clean or before_the_stop)
    configuration_error = code == EXIT_CONFIGURATION and not stopping
    assert getattr(supervisor, "_configuration_error", False) == configuration_error
    assert supervisor._stopping == (stopping or configuration_error)
