"""Helpers shared by the test suite (no fixtures here: see conftest.py)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pika
import pika.exceptions

BROKER_URL = os.environ.get("DOMAIN_EVENT_BROKER", "amqp://guest:guest@localhost:5672/%2F")

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


#: How to run rabbitmqctl, e.g. ``docker compose exec -T rabbitmq rabbitmqctl``.
RABBITMQCTL_VARIABLE = "DEB_TEST_RABBITMQCTL"
#: Which node rabbitmqctl talks to (default: the local default node).
NODE_VARIABLE = "DEB_TEST_RABBITMQ_NODE"


def rabbitmqctl_command(with_node: bool = True) -> list[str]:
    """The one place every test takes its broker command from: rabbitmqctl for
    the test broker's node (``DEB_TEST_RABBITMQCTL``, ``DEB_TEST_RABBITMQ_NODE``).

    ``with_node=False`` leaves out ``-n NODE`` (for callers that add it).
    """
    command = shlex.split(os.environ.get(RABBITMQCTL_VARIABLE, "rabbitmqctl"))
    node = os.environ.get(NODE_VARIABLE)
    return [*command, "-n", node] if node and with_node else command


def rabbitmqctl_rows(listing: str, *columns: str) -> list[list[str]]:
    """The rows of ``rabbitmqctl list_<listing> COLUMNS``, split on blanks
    (rows without a value in every column are left out)."""
    result = subprocess.run(
        [*rabbitmqctl_command(), "-q", f"list_{listing}", *columns, "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = (line.split() for line in result.stdout.splitlines())
    return [row for row in rows if len(row) >= len(columns)]


def raw_connection() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(BROKER_URL))


def queue_size(name: str) -> int | None:
    """Messages ready in queue ``name``, or None when it does not exist."""
    connection = raw_connection()
    try:
        channel = connection.channel()
        try:
            return int(channel.queue_declare(name, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
    finally:
        if connection.is_open:
            connection.close()


def consumer_count(name: str) -> int:
    """Consumers of queue ``name`` (0 when it does not exist)."""
    connection = raw_connection()
    try:
        return int(connection.channel().queue_declare(name, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def queue_exists(name: str) -> bool:
    return queue_size(name) is not None


def exchange_exists(name: str) -> bool:
    connection = raw_connection()
    try:
        channel = connection.channel()
        try:
            channel.exchange_declare(name, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
    finally:
        if connection.is_open:
            connection.close()


def get_messages(
    name: str, limit: int = 1000
) -> list[tuple[pika.spec.Basic.GetOk, pika.BasicProperties, bytes]]:
    """Take (and acknowledge) up to ``limit`` messages from queue ``name``."""
    connection = raw_connection()
    messages = []
    try:
        channel = connection.channel()
        while len(messages) < limit:
            method, properties, body = channel.basic_get(name, auto_ack=True)
            if method is None:
                break
            messages.append((method, properties, body))
    finally:
        connection.close()
    return messages


class CountingSocket:
    """Stands in for a pika transport's socket and records its I/O: each
    ``send()`` as (bytes asked to send, bytes taken), the ``recv()`` calls
    and how many of them would have blocked."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[tuple[int, int]] = []
        self.reads = 0
        self.would_block = 0

    def send(self, data: bytes) -> int:
        taken = self.sock.send(data)
        self.sends.append((len(data), taken))
        return taken

    def recv(self, size: int) -> bytes:
        self.reads += 1
        try:
            return self.sock.recv(size)
        except BlockingIOError:
            self.would_block += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def count_socket_io(transport: Any) -> CountingSocket:
    """Put a :class:`CountingSocket` in ``transport`` (pika's); return it."""
    counting = CountingSocket(transport._sock)
    transport._sock = counting
    return counting
