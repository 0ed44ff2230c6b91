"""Tools for fault tests: rabbitmqctl control, recording handlers, a consuming thread."""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
import pytest

from domain_event_broker import Subscriber

from ..helpers import wait_for

#: Jepsen-style and soak counts, shown in the terminal summary.
REPORTS: list[str] = []


class RabbitControl:
    """Runs ``rabbitmqctl`` against the test broker's node."""

    def __init__(
        self, node: str | None, url: str, command: Sequence[str] = ("rabbitmqctl",)
    ) -> None:
        self.command = list(command)
        self.node = node
        parts = urllib.parse.urlsplit(url)
        self.vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.url = url
        self._saved_env: dict[str, str] = {}

    def ctl(self, *args: str, timeout: float = 60) -> str:
        command = [*self.command, *(["-n", self.node] if self.node else []), "-q", *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}"
            )
        return result.stdout.strip()

    def eval(self, expression: str) -> str:
        return self.ctl("eval", expression)

    def version(self) -> tuple[int, ...]:
        """The node's RabbitMQ version, e.g. ``(4, 3, 6)``."""
        text = self.eval("rabbit:base_product_version().").strip().strip('"')
        return tuple(int(part) for part in re.findall(r"\d+", text)[:3])

    def queue_messages(self, queue: str) -> int | None:
        """Messages in ``queue``, ready and unacknowledged; None if it does not exist."""
        listing = self.ctl("list_queues", "-p", self.vhost, "name", "messages")
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return None

    # -- faults -------------------------------------------------------------------

    def close_all_connections(self) -> None:
        """Every client connection is closed by the broker (reply code 320)."""
        self.ctl("close_all_connections", "-p", self.vhost, "fault injected by the test suite")

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_until_answering()

    def set_memory_alarm(self) -> None:
        self.eval("rabbit_alarm:set_alarm({{resource_limit, memory, node()}, []}).")

    def clear_memory_alarm(self) -> None:
        self.eval("rabbit_alarm:clear_alarm({resource_limit, memory, node()}).")

    def set_env(self, **settings: int) -> None:
        """``application:set_env(rabbit, Key, Value)`` for each setting, in one call.

        The old values are restored by :meth:`restore`.
        """
        keys = [key for key in settings if key not in self._saved_env]
        statements = [
            f"application:set_env(rabbit, {key}, {value})" for key, value in settings.items()
        ]
        olds = ", ".join(f"application:get_env(rabbit, {key})" for key in keys)
        output = self.eval(f"Old = [{olds}], {', '.join(statements)}, Old.")
        values = re.findall(r"\{ok,(\d+)\}|(undefined)", output)
        assert len(values) == len(keys), output
        for key, (number, _) in zip(keys, values, strict=True):
            self._saved_env[key] = number

    def wait_until_answering(self, timeout: float = 60) -> None:
        def answers() -> bool:
            try:
                connection = pika.BlockingConnection(pika.URLParameters(self.url))
            except pika.exceptions.AMQPError:
                return False
            connection.close()
            return True

        wait_for(answers, timeout=timeout, interval=0.2, message="the broker to answer")

    def restore(self) -> None:
        """Leave the broker as it was: app started, no alarm, settings restored."""
        statements = [
            "rabbit:start()",
            "rabbit_alarm:clear_alarm({resource_limit, memory, node()})",
        ]
        for key, old in self._saved_env.items():
            if old:
                statements.append(f"application:set_env(rabbit, {key}, {old})")
            else:
                statements.append(f"application:unset_env(rabbit, {key})")
        self._saved_env.clear()
        self.eval(", ".join(statements) + ", ok.")
        self.wait_until_answering()


class Recorder:
    """A handler that records what it received (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def uuids(self) -> list[str]:
        with self.lock:
            return [event.uuid_string for event in self.events]

    def count(self) -> int:
        with self.lock:
            return len(self.events)


class RunningSubscriber:
    """A :class:`Subscriber` consuming in a background thread."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.error: BaseException | None = None
        self.returned = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-subscriber", daemon=True)

    def _run(self) -> None:
        try:
            self.subscriber.start_consuming()
        except BaseException as exc:
            self.error = exc
        finally:
            self.returned.set()

    def start(self) -> RunningSubscriber:
        self.thread.start()
        return self

    def assert_running(self) -> None:
        assert not self.returned.is_set(), f"start_consuming() returned ({self.error!r})"

    def stop(self, timeout: float = 30) -> None:
        self.subscriber.stop_consuming()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "start_consuming() did not return after stop"
        if self.error is not None:
            raise AssertionError("start_consuming() raised") from self.error


def unique(prefix: str = "faults") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def library_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """Records of exactly ``level`` logged by the library itself (not pika)."""
    return [
        record
        for record in caplog.records
        if record.name.startswith("domain_event_broker") and record.levelno == level
    ]
