"""``domain-event-broker worker`` and ``health``: run subscribers in production.

::

    domain-event-broker worker MODULE:ATTRIBUTE [--processes N]
        [--health-file F] [--metrics-port P] [--log-format text|json]
    domain-event-broker health --file F --max-age SECONDS

``MODULE:ATTRIBUTE`` names a :class:`~domain_event_broker.Subscriber` with
its handlers registered, or a callable taking no argument that returns one
(called in each worker process, so connections are never shared).

With ``--processes 1`` (the default) the subscriber runs in this process.
With more, this process supervises that many child processes: it restarts
one that fails, after a backoff (1 s doubling to 30 s), gives up on one that
fails ``--max-restarts`` times in a row (then stops the others and exits 1),
passes SIGTERM and SIGINT on, and exits 0 once every child stopped
gracefully. A child that exits with status 2 (:data:`EXIT_CONFIGURATION`:
its configuration is wrong, e.g. its metrics port is taken) is not
restarted: the supervisor stops the others at once and exits 2. The
supervisor holds no broker connection: it loads the subscriber once to
report a wrong ``MODULE:ATTRIBUTE`` early, then closes its connection.

**A stop while starting.** A worker that receives SIGTERM or SIGINT before
its subscriber consumes (importing, building the subscriber, connecting)
stops there and exits 0: it received nothing yet. The supervisor starts
its children with those signals blocked; each unblocks them once its
handler is installed, so a signal passed on to a child that is just
(re)starting is neither lost nor fatal. A child that the supervisor's own
SIGTERM ends all the same still counts as stopped gracefully.

**Health check: a file, not an HTTP endpoint.** The subscriber's own loop
touches ``--health-file`` every few seconds while it is connected and its
handler is not stuck; ``domain-event-broker health --file F --max-age S``
exits 1 when the file is older than ``S`` seconds. A file needs no port per
process, no server thread that could keep answering while the loop is
stalled, and works as a Kubernetes ``exec`` probe, from a systemd timer or
from any script. With several processes each child touches ``F.<index>``
and the parent gives ``F`` the time of the stalest child, so ``F`` is stale
as soon as one child is.

**Metrics.** ``--metrics-port P`` serves the OpenTelemetry metrics in the
Prometheus text format at ``http://HOST:P/metrics``, through the
OpenTelemetry Prometheus exporter and ``prometheus_client`` (extra
``prometheus``): the standard exposition format, maintained upstream, and
the same metrics any other OpenTelemetry exporter would see. Child ``i`` of
``--processes N`` serves on ``P + i``.

.. versionadded:: 4.1
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from .._amqp.connect import Backoff
from .._core.signals import STOP_SIGNALS  # passed on to the children, blocked while they start
from .._subscribing.subscriber import Subscriber
from .._telemetry.heartbeat import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_STALL_AFTER, Heartbeat
from .._telemetry.heartbeat import health_file_age as _health_file_age
from .._telemetry.log_fields import EventLogFilter
from ..errors import ConfigurationError

__all__ = ["Supervisor", "WorkerOptions", "check_health", "load_subscriber", "run_worker"]

log = logging.getLogger(__name__)

#: Restarts of one child in a row (each within STABLE_AFTER of its start)
#: after which the supervisor gives up.
DEFAULT_MAX_RESTARTS: Final = 5
#: A child that ran this long (seconds) before failing starts a new series.
STABLE_AFTER: Final = 60.0
#: First and longest pause (seconds) before restarting a failed child.
RESTART_BACKOFF: Final = 1.0
MAX_RESTART_BACKOFF: Final = 30.0
#: Seconds between two looks of the supervisor at its children.
SUPERVISE_INTERVAL: Final = 0.2
#: Default address of the metrics endpoint: every interface, for a scraper
#: on another host (use --metrics-host 127.0.0.1 to keep it local).
ALL_INTERFACES: Final = "0.0.0.0"  # noqa: S104
STDIN_FILENO: Final = 0
#: Exit statuses.
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
#: A configuration error (as argparse's usage errors): a supervised child
#: exiting with it is not restarted, and the supervisor exits with it too.
EXIT_CONFIGURATION: Final = 2


# -- loading the user's subscriber ---------------------------------------------


def load_subscriber(spec: str) -> Subscriber:
    """The :class:`Subscriber` named by ``MODULE:ATTRIBUTE``.

    Args:
        spec: ``package.module:name`` (``name`` may be dotted); the object
            is a Subscriber or a callable taking no argument returning one.

    Returns:
        The subscriber.

    Raises:
        ConfigurationError: the spec is malformed, the module or attribute
            does not exist, or it is not (and does not return) a Subscriber.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"expected MODULE:ATTRIBUTE (e.g. myapp.workers:subscriber), not {spec!r}"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the project's modules
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    if isinstance(target, Subscriber):
        return target
    if callable(target):
        made = target()
        if isinstance(made, Subscriber):
            return made
        raise ConfigurationError(f"{spec} returned {type(made).__name__}, not a Subscriber")
    raise ConfigurationError(f"{spec} is a {type(target).__name__}, not a Subscriber or a callable")


# -- options ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerOptions:
    """What ``worker`` was asked to do (parsed and checked).

    .. versionadded:: 4.1
    """

    spec: str
    processes: int = 1
    health_file: Path | None = None
    health_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    stall_after: float = DEFAULT_STALL_AFTER
    metrics_port: int | None = None
    metrics_host: str = ALL_INTERFACES
    max_restarts: int = DEFAULT_MAX_RESTARTS
    log_format: str = "text"
    #: Set in a child of the supervisor: stop when standard input closes.
    child: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def child_arguments(self, index: int) -> list[str]:
        """Command-line options for child ``index`` of the supervisor."""
        arguments = [
            self.spec,
            "--processes",
            "1",
            "--child",
            "--max-restarts",
            str(self.max_restarts),
            "--health-interval",
            repr(self.health_interval),
            "--stall-after",
            repr(self.stall_after),
            "--log-format",
            self.log_format,
        ]
        if self.health_file is not None:
            arguments += ["--health-file", str(child_health_file(self.health_file, index))]
        if self.metrics_port is not None:
            arguments += [
                "--metrics-port",
                str(self.metrics_port + index),
                "--metrics-host",
                self.metrics_host,
            ]
        return arguments


def child_health_file(path: Path, index: int) -> Path:
    """The heartbeat file of child ``index`` of a supervisor using ``path``."""
    return path.with_name(f"{path.name}.{index}")


# -- logging -----------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the event
    fields (``event_uuid``, ``routing_key``, ``handler``), process id and
    the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        document: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "event_uuid": getattr(record, "event_uuid", None),
            "routing_key": getattr(record, "routing_key", None),
            "handler": getattr(record, "handler", None),
            "pid": record.process,
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


TEXT_FORMAT: Final = (
    "%(asctime)s %(levelname)s %(process)d %(name)s [%(handler)s %(event_uuid)s]: %(message)s"
)


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Root logging for a worker: one stderr handler with the event fields."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(EventLogFilter())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.WARNING)


# -- metrics -------------------------------------------------------------------------


def serve_metrics(port: int, host: str = ALL_INTERFACES) -> None:
    """Serve the OpenTelemetry metrics for Prometheus on ``host:port``.

    Installs an OpenTelemetry ``MeterProvider`` with a Prometheus reader.

    Raises:
        ConfigurationError: the ``prometheus`` extra is not installed, or
            the port cannot be bound.
    """
    try:
        from opentelemetry import metrics  # noqa: PLC0415
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
        from prometheus_client import start_http_server  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigurationError(
            "--metrics-port needs the OpenTelemetry SDK and Prometheus exporter: "
            f"pip install 'domain-event-broker[prometheus]' ({exc})"
        ) from exc
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    log.info("Serving metrics for Prometheus on http://%s:%d/metrics", host, port)


# -- one worker process -------------------------------------------------------------------


def _attach_heartbeat(subscriber: Subscriber, heartbeat: Heartbeat) -> Callable[[], None]:
    """Have ``subscriber`` tick ``heartbeat`` from its consuming loop.

    The loop calls ``heartbeat.tick(handler_busy_for)`` after every poll while
    connected, so the file goes stale when the worker is disconnected, its
    loop is stuck, or a handler runs longer than the stall limit.

    Returns:
        A function that detaches it (the subscriber keeps no other state).
    """
    subscriber.add_tick_callback(heartbeat.tick)
    return lambda: None


def _stop_when_parent_goes(subscriber: Subscriber) -> None:
    """In a supervised child: stop gracefully when the parent's pipe on
    standard input closes (the parent died without passing a signal on)."""

    def wait_for_eof() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered
        # reader holds its lock and aborts the interpreter's shutdown.
        with contextlib.suppress(OSError):
            while os.read(STDIN_FILENO, 4096):
                pass
        log.warning("The supervising process is gone; stopping")
        subscriber.stop_consuming()

    threading.Thread(target=wait_for_eof, name="domain-event-broker-parent", daemon=True).start()


class _StopWhileStarting(BaseException):
    """A stop signal arrived while the worker was still starting (a
    BaseException, like KeyboardInterrupt: user code must not swallow it)."""


class _StartingStop:
    """The stop-signal handler of a worker until its subscriber consumes.

    The subscriber installs its own graceful handler for the time it
    consumes; before that (importing, building the subscriber, connecting)
    this one ends the start: nothing was received yet, so nothing is lost.
    After the consuming loop has run (its first tick), a late signal is
    ignored: the worker is stopping anyway.
    """

    def __init__(self) -> None:
        self.consuming = False

    def tick(self, busy_for: float) -> None:
        """A tick callback: the consuming loop is running."""
        self.consuming = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.consuming:
            raise _StopWhileStarting(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the stop signals, then unblock them (a supervisor starts
        its children with them blocked: one sent earlier is delivered now)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self) for signum in STOP_SIGNALS}
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def run_one(options: WorkerOptions) -> int:
    """Run the subscriber in this process until SIGTERM or SIGINT.

    A stop signal that arrives while the worker is still starting ends the
    start: the worker exits 0 without consuming.

    Returns:
        0 once it stopped gracefully.

    Raises:
        ConfigurationError: the spec or the metrics port is wrong.
        DomainEventBrokerError: consuming failed for good.
    """
    starting = _StartingStop()
    try:
        with starting.installed():
            return _consume(options, starting)
    except _StopWhileStarting as stop:
        log.info(
            "Worker %d received signal %d while starting; stopped before consuming",
            os.getpid(),
            stop.args[0],
        )
        return EXIT_OK


def _consume(options: WorkerOptions, starting: _StartingStop) -> int:
    if options.metrics_port is not None:
        serve_metrics(options.metrics_port, options.metrics_host)
    subscriber = load_subscriber(options.spec)
    detach: Callable[[], None] = lambda: None  # noqa: E731
    heartbeat = None
    if options.health_file is not None:
        heartbeat = Heartbeat(
            options.health_file, interval=options.health_interval, stall_after=options.stall_after
        )
        heartbeat.clear()
        detach = _attach_heartbeat(subscriber, heartbeat)
    if options.child:
        _stop_when_parent_goes(subscriber)
    subscriber.add_tick_callback(starting.tick)
    log.info("Worker %d consuming with %r", os.getpid(), subscriber)
    try:
        subscriber.start_consuming()
    finally:
        detach()
        if heartbeat is not None:
            heartbeat.clear()
    log.info("Worker %d stopped", os.getpid())
    return EXIT_OK


# -- the supervisor -----------------------------------------------------------------------


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    #: The pause before each restart of a series of failures.
    backoff: Backoff = field(
        default_factory=lambda: Backoff(RESTART_BACKOFF, MAX_RESTART_BACKOFF, jitter=False)
    )
    restart_at: float | None = None
    done: bool = False
    returncode: int | None = None
    #: The supervisor sent the running process SIGTERM.
    signalled: bool = False


class Supervisor:
    """Runs ``processes`` children and keeps them running (see the module doc).

    Args:
        options: the worker options (``processes`` > 1).
        command: the command line that starts one worker, without its
            options, e.g. ``[sys.executable, "-m", "domain_event_broker", "worker"]``.

    .. versionadded:: 4.1
    """

    def __init__(self, options: WorkerOptions, command: Sequence[str]) -> None:
        self.options = options
        self.command = list(command)
        self.children = [_Child(index) for index in range(options.processes)]
        self._stopping = False
        self._failed = False
        self._configuration_error = False
        self._wakeup = threading.Event()

    def _start(self, child: _Child) -> None:
        if self.options.health_file is not None:
            child_health_file(self.options.health_file, child.index).unlink(missing_ok=True)
        env = {**os.environ, **self.options.extra_env}
        # The child starts with the stop signals blocked (a signal mask is
        # inherited through fork and exec) and unblocks them once its handler
        # is installed: a SIGTERM passed on while it starts neither is lost
        # nor kills it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            child.process = subprocess.Popen(  # noqa: S603  # our own command line
                [*self.command, *self.options.child_arguments(child.index)],
                stdin=subprocess.PIPE,  # closes when this process dies: the child stops
                env=env,
                start_new_session=True,  # a terminal's ^C reaches the parent only
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.started = time.monotonic()
        child.restart_at = None
        child.signalled = False
        log.info("Started worker %d (pid %d)", child.index, child.process.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("Received signal %d: stopping %d worker(s)", signum, len(self.children))
        self._stop_all()

    def _stop_all(self) -> None:
        """Ask every running child to stop (SIGTERM), and restart none."""
        self._stopping = True
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None:
                child.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        self._wakeup.set()

    def run(self) -> int:
        """Start the children and supervise them until all stopped.

        Returns:
            0 when every child stopped gracefully, 2 when one exited with a
            configuration error, 1 when one failed for good (or did not stop
            gracefully).
        """
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            for child in self.children:
                self._start(child)
            while not all(child.done for child in self.children):
                self._wakeup.wait(SUPERVISE_INTERVAL)
                self._wakeup.clear()
                for child in self.children:
                    self._check(child)
                self._update_health()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._cleanup()
        if self._configuration_error:
            return EXIT_CONFIGURATION
        if self._failed or any(child.returncode != 0 for child in self.children):
            return EXIT_FAILED
        return EXIT_OK

    def _check(self, child: _Child) -> None:
        if child.done:
            return
        now = time.monotonic()
        process = child.process
        if process is None:  # waiting to restart
            if self._stopping:
                child.done = True
                child.returncode = 0 if not self._failed else child.returncode
            elif child.restart_at is not None and now >= child.restart_at:
                self._start(child)
            return
        code = process.poll()
        if code is None:
            return
        self._close(process)
        child.process = None
        if code == -signal.SIGTERM and child.signalled:
            # Our SIGTERM reached it before it installed its handler (it
            # was starting): it had nothing in flight. A stop asked for.
            log.info(
                "Worker %d (pid %d) ended by SIGTERM before it was ready", child.index, process.pid
            )
            code = EXIT_OK
        child.returncode = code
        if code == EXIT_CONFIGURATION and not self._stopping:
            log.error(
                "Worker %d (pid %d) exited with %d: a configuration error (see above); "
                "not restarting it, stopping all workers",
                child.index,
                process.pid,
                code,
            )
            child.done = True
            self._configuration_error = True
            self._stop_all()
            return
        if code == 0 or self._stopping:
            if code != 0 and not child.signalled and code != EXIT_CONFIGURATION:
                # It ended before the stop reached it (e.g. killed just before
                # the SIGTERM): it would have been restarted, and a stop was
                # asked for. What it held goes back to the broker.
                log.warning(
                    "Worker %d (pid %d) exited with %d before the stop reached it; "
                    "not restarting it",
                    child.index,
                    process.pid,
                    code,
                )
                child.returncode = EXIT_OK
            elif code != 0:
                log.error("Worker %d (pid %d) exited with %d", child.index, process.pid, code)
            child.done = True
            return
        if now - child.started >= STABLE_AFTER:  # a new series
            child.failures = 0
            child.backoff.reset()
        child.failures += 1
        if child.failures > self.options.max_restarts:
            log.error(
                "Worker %d failed %d times in a row (last exit status %d); giving up",
                child.index,
                child.failures,
                code,
            )
            child.done = True
            self._failed = True
            self._stop_all()
            return
        delay = child.backoff.next()
        log.warning(
            "Worker %d (pid %d) exited with %d; restarting in %.0fs",
            child.index,
            process.pid,
            code,
            delay,
        )
        child.restart_at = now + delay

    @staticmethod
    def _close(process: subprocess.Popen[bytes]) -> None:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        process.wait()

    def _update_health(self) -> None:
        """Give the health file the time of the stalest child's heartbeat."""
        path = self.options.health_file
        if path is None or self._stopping:
            return
        oldest: float | None = None
        for child in self.children:
            try:
                modified = child_health_file(path, child.index).stat().st_mtime
            except FileNotFoundError:
                return  # a child is not (yet) healthy: leave the file to age
            oldest = modified if oldest is None else min(oldest, modified)
        if oldest is None:
            return
        try:
            path.touch()
            os.utime(path, (oldest, oldest))
        except OSError as exc:
            log.warning("Could not touch the health file %s: %s", path, exc)

    def _cleanup(self) -> None:
        path = self.options.health_file
        if path is None:
            return
        path.unlink(missing_ok=True)
        for child in self.children:
            child_health_file(path, child.index).unlink(missing_ok=True)


# -- the commands ---------------------------------------------------------------------------


def run_worker(options: WorkerOptions, command: Sequence[str]) -> int:
    """Run ``worker`` with ``options``: in this process, or supervised.

    Args:
        options: the parsed options.
        command: how to start one worker process (for ``--processes`` > 1).

    Returns:
        The exit status: 0 after a graceful stop, 1 when a worker failed for
        good, 2 (:data:`EXIT_CONFIGURATION`) when a supervised child's
        configuration is wrong.

    Raises:
        ConfigurationError: the spec or the metrics port is wrong (not in a
            supervised child: it logs the error and returns 2 instead).
    """
    configure_logging(options.log_format)
    if options.processes == 1:
        if not options.child:
            return run_one(options)
        try:
            return run_one(options)
        except ConfigurationError as exc:
            # One line for the supervisor's log, not a usage block per child;
            # the status tells the supervisor not to restart this child.
            log.error("Worker %d cannot start: %s", os.getpid(), exc)
            return EXIT_CONFIGURATION
    starting = _StartingStop()
    try:
        with starting.installed():
            # Fail now on a wrong spec, not N times later; then close the
            # subscriber's connection: the children make their own.
            load_subscriber(options.spec).close()
    except _StopWhileStarting as stop:
        log.info("Received signal %d while starting; no worker started", stop.args[0])
        return EXIT_OK
    return Supervisor(options, command).run()


def check_health(path: Path, max_age: float) -> tuple[bool, str]:
    """Whether the health file ``path`` was touched within ``max_age`` seconds.

    Returns:
        ``(healthy, one line saying why)``.
    """
    age = _health_file_age(path)
    if age is None:
        return False, f"unhealthy: {path} does not exist (worker not started or not connected)"
    if age > max_age:
        return False, f"unhealthy: {path} was last touched {age:.1f}s ago (limit {max_age:g}s)"
    return True, f"healthy: {path} was touched {age:.1f}s ago"
