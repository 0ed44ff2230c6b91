"""Publishing against the running broker, read back with raw pika."""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

import domain_event_broker._amqp.connect as connect_module
import domain_event_broker._amqp.link as link_module
import domain_event_broker._publishing.publisher as publish_module
import domain_event_broker._publishing.sender as sender_module
from domain_event_broker import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DomainEvent,
    Publisher,
    PublishError,
    configure,
    publish_domain_event,
)
from domain_event_broker._amqp.config import ENVIRONMENT_VARIABLE, FILE_ENVIRONMENT_VARIABLE

from .conftest import Names
from .helpers import (
    BROKER_URL,
    count_socket_io,
    rabbitmqctl_command,
    rabbitmqctl_rows,
    wait_for,
)

EXCHANGE = "domain-events"
#: A URL where nothing listens (port 1 refuses connections at once).
DEAD_URL = "amqp://guest:guest@127.0.0.1:1/%2F"

Message = tuple[pika.spec.Basic.GetOk, pika.BasicProperties, bytes]


@dataclass
class Inbox:
    """A queue bound to ``exchange`` with ``<queue>.#``; reads with raw pika."""

    channel: BlockingChannel
    queue: str
    exchange: str = EXCHANGE
    messages: list[Message] = field(default_factory=list)

    @property
    def key(self) -> str:
        """A routing key that reaches this inbox."""
        return f"{self.queue}.created"

    def ready(self) -> int:
        """Messages waiting in the queue now (no waiting)."""
        return int(self.channel.queue_declare(self.queue, passive=True).method.message_count)

    def take(self) -> None:
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return
            self.messages.append((method, properties, body))

    def wait(self, count: int, timeout: float = 15.0) -> list[Message]:
        """Poll until at least ``count`` messages arrived; return them all."""

        def enough() -> bool:
            self.take()
            return len(self.messages) >= count

        wait_for(enough, timeout, interval=0.05, message=f"{count} messages in {self.queue}")
        return self.messages

    def events(self) -> list[DomainEvent]:
        return [DomainEvent.from_json(body) for _, _, body in self.messages]


def make_inbox(channel: BlockingChannel, names: Names, exchange: str = EXCHANGE) -> Inbox:
    queue = names.new("test-publish")
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, exchange, routing_key=f"{queue}.#")
    return Inbox(channel, queue, exchange)


@pytest.fixture
def inbox(channel: BlockingChannel, names: Names) -> Inbox:
    return make_inbox(channel, names)


@pytest.fixture(autouse=True)
def _fresh_shared_publishers() -> Iterator[None]:
    """Each test starts without the connections publish_domain_event keeps."""
    publish_module.close_shared_publishers()
    yield
    publish_module.close_shared_publishers()


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every connection the publishing code opens."""
    calls: list[str] = []
    real = link_module.connect

    def spy(config: Any, name: str, **kwargs: Any) -> pika.BlockingConnection:
        if "publisher" in name:
            calls.append(name)
        return real(config, name, **kwargs)

    monkeypatch.setattr(link_module, "connect", spy)
    return calls


@pytest.fixture
def pika_connections(monkeypatch: pytest.MonkeyPatch) -> list[pika.ConnectionParameters]:
    """The parameters of every connection pika is asked to open, in order
    (whether it opens or not)."""
    attempts: list[pika.ConnectionParameters] = []
    real = pika.BlockingConnection

    def spy(parameters: Any = None, *args: Any, **kwargs: Any) -> pika.BlockingConnection:
        attempts.append(parameters)
        return real(parameters, *args, **kwargs)

    monkeypatch.setattr(pika, "BlockingConnection", spy)
    return attempts


class VirtualClock:
    """Stands in for the ``time`` module of the library's two retry loops
    (connecting, and publishing): ``monotonic()`` moves only when ``sleep()``
    is called, and ``sleep()`` returns at once.

    Their deadlines are then checked exactly, however loaded the machine:
    attempts take no time on this clock, so a loop that never waits past its
    bound ends below it, and one that does ends above it.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """A :class:`VirtualClock` for the library's connecting and publishing."""
    clock = VirtualClock()
    monkeypatch.setattr(connect_module, "time", clock)
    monkeypatch.setattr(sender_module, "time", clock)
    return clock


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records every basic_publish made in this process."""
    calls: list[dict[str, Any]] = []
    real = BlockingChannel.basic_publish

    def spy(self: BlockingChannel, *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_publish", spy)
    return calls


# -- a publish read back with raw pika ----------------------------------------------


def test_publish_read_back_with_raw_pika(inbox: Inbox) -> None:
    event = publish_domain_event(inbox.key, {"name": "Ada", "n": 1}, domain_object_id="user-1")

    ((method, properties, body),) = inbox.wait(1)
    assert method.exchange == EXCHANGE
    assert method.routing_key == inbox.key
    assert body == event.to_json().encode("utf-8")
    assert json.loads(body) == {
        "routing_key": inbox.key,
        "data": {"name": "Ada", "n": 1},
        "domain_object_id": "user-1",
        "uuid_string": event.uuid_string,
        "timestamp": event.timestamp,
    }
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    assert properties.message_id == event.uuid_string
    assert properties.timestamp == int(event.timestamp)
    assert DomainEvent.from_json(body) == event


def test_given_uuid_and_timestamp_are_sent(inbox: Inbox) -> None:
    event = publish_domain_event(inbox.key, [1, 2], None, "my-uuid", 1500000000.25)
    assert (event.uuid_string, event.timestamp) == ("my-uuid", 1500000000.25)
    ((_, properties, body),) = inbox.wait(1)
    assert json.loads(body)["uuid_string"] == "my-uuid"
    assert json.loads(body)["timestamp"] == 1500000000.25
    assert properties.timestamp == 1500000000


def test_publish_returns_only_after_the_broker_confirmed(inbox: Inbox) -> None:
    for n in range(20):
        publish_domain_event(inbox.key, {"n": n})
    # Confirmed means routed and enqueued: all 20 are there already, no waiting.
    assert inbox.ready() == 20


# 3.0.2 also sent a str timestamp, which every subscriber then dead-letters:
# 4.1 refuses it before sending (tests/test_boundaries.py).
@pytest.mark.parametrize("timestamp", [-1.0, 2.0**70])
def test_timestamps_3_0_2_accepted_are_still_sent(inbox: Inbox, timestamp: Any) -> None:
    event = publish_domain_event(inbox.key, {}, timestamp=timestamp)
    ((_, properties, body),) = inbox.wait(1)
    assert json.loads(body)["timestamp"] == timestamp
    assert body == event.to_json().encode("utf-8")
    assert properties.timestamp is None  # cannot be an AMQP timestamp


def count_writer_turns(connection: pika.BlockingConnection) -> list[int]:
    """Each time pika's loop is asked to watch the socket for writability."""
    nbio = connection._impl._transport._nbio
    turns: list[int] = []
    set_writer = nbio.set_writer

    def spy(fd: int, on_writable: Callable[[], None]) -> None:
        turns.append(fd)
        set_writer(fd, on_writable)

    nbio.set_writer = spy
    return turns


@pytest.mark.fast_paths
@pytest.mark.parametrize("size", [10, 300_000])  # 300 kB: three body frames at 128 KiB
def test_each_message_reaches_the_socket_in_one_send_at_once(inbox: Inbox, size: int) -> None:
    publisher = Publisher(BROKER_URL)
    connection = publisher.connection
    assert connection is not None
    sends = count_socket_io(connection._impl._transport)
    writer_turns = count_writer_turns(connection)
    try:
        for n in range(3):
            publisher.publish_event(DomainEvent(inbox.key, {"n": n, "pad": "x" * size}))
        sent = list(sends.sends)
    finally:
        publisher.close()
    # Method, header and body frames joined per message, handed over as the
    # message is published: the socket takes it whole, no loop turn needed.
    assert [asked for asked, _ in sent] == [taken for _, taken in sent], sent
    assert len(sent) == 3, sent
    assert all(asked > size for asked, _ in sent), sent
    assert writer_turns == []
    bodies = [json.loads(body) for _, _, body in inbox.wait(3)]
    assert [body["data"]["n"] for body in bodies] == [0, 1, 2]
    assert all(len(body["data"]["pad"]) == size for body in bodies)


@pytest.mark.fast_paths
def test_confirms_are_read_without_a_read_that_would_block(inbox: Inbox) -> None:
    publisher = Publisher(BROKER_URL)
    connection = publisher.connection
    assert connection is not None
    reads = count_socket_io(connection._impl._transport)
    try:
        for n in range(20):
            publisher.publish_event(DomainEvent(inbox.key, {"n": n}))
    finally:
        publisher.close()
    # One read per confirm: a short read means the socket is empty, so
    # there is no second read to be told "would block".
    assert reads.reads >= 20
    assert reads.would_block == 0, (reads.reads, reads.would_block)
    assert len(inbox.wait(20)) == 20


@pytest.mark.fast_paths
def test_what_the_socket_does_not_take_at_once_follows_in_order(inbox: Inbox) -> None:
    big = 12 * 1024 * 1024  # past the kernel's largest send buffer here (4 MiB)
    publisher = Publisher(BROKER_URL)
    connection = publisher.connection
    assert connection is not None
    sends = count_socket_io(connection._impl._transport)
    try:
        publisher.publish_event(DomainEvent(inbox.key, {"n": 0, "pad": "a" * big}))
        publisher.publish_event(DomainEvent(inbox.key, {"n": 1, "pad": "b"}))
        sent = list(sends.sends)
    finally:
        publisher.close()
    assert any(taken < asked for asked, taken in sent), sent  # the path under test ran
    bodies = [json.loads(body) for _, _, body in inbox.wait(2, timeout=30)]
    assert [body["data"]["n"] for body in bodies] == [0, 1]
    assert bodies[0]["data"]["pad"] == "a" * big
    assert bodies[1]["data"]["pad"] == "b"


def test_one_connection_and_one_exchange_declare_for_many_events(
    inbox: Inbox, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    declares: list[str] = []
    real = BlockingChannel.exchange_declare

    def spy(self: BlockingChannel, exchange: str, *args: Any, **kwargs: Any) -> Any:
        declares.append(exchange)
        return real(self, exchange, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "exchange_declare", spy)
    for n in range(50):
        publish_domain_event(inbox.key, {"n": n})
    assert len(connects) == 1
    assert declares == [EXCHANGE]
    assert len(inbox.wait(50)) == 50


# -- many threads ------------------------------------------------------------------------

THREADS = 8
EVENTS_PER_THREAD = 100


@pytest.mark.parametrize("how", ["publish_domain_event", "one Publisher"])
def test_many_threads_publish_every_event_exactly_once(inbox: Inbox, how: str) -> None:
    publisher = Publisher()
    published: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(thread: int) -> None:
        try:
            start.wait()
            for n in range(EVENTS_PER_THREAD):
                data = {"thread": thread, "n": n}
                if how == "publish_domain_event":
                    event = publish_domain_event(inbox.key, data)
                else:
                    event = publisher.publish_event(DomainEvent(inbox.key, data))
                published.append(event.uuid_string)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    publisher.close()
    assert errors == []
    assert len(published) == THREADS * EVENTS_PER_THREAD

    inbox.wait(THREADS * EVENTS_PER_THREAD)
    inbox.take()  # anything extra would be a duplicate
    received = collections.Counter(event.uuid_string for event in inbox.events())
    assert set(received) == set(published)
    assert max(received.values()) == 1
    pairs = {(e.data["thread"], e.data["n"]) for e in inbox.events()}
    assert len(pairs) == THREADS * EVENTS_PER_THREAD


def concurrent_publishes(monkeypatch: pytest.MonkeyPatch, parties: int) -> threading.Barrier:
    """Make every basic_publish wait until ``parties`` of them are under way at once.

    With publishes taking turns on one connection, the barrier breaks.
    """
    barrier = threading.Barrier(parties, timeout=10)
    real = BlockingChannel.basic_publish

    def together(self: BlockingChannel, *args: Any, **kwargs: Any) -> None:
        barrier.wait()
        real(self, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_publish", together)
    return barrier


def run_threads(count: int, work: Callable[[int], None], timeout: float = 60) -> None:
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert errors == []


def test_threads_publish_at_the_same_time_on_their_own_connections(
    inbox: Inbox, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    concurrent_publishes(monkeypatch, 4)
    run_threads(4, lambda n: [publish_domain_event(inbox.key, {"n": n}) for _ in range(3)])
    assert len(connects) == 4
    assert len(inbox.wait(12)) == 12


def test_connections_are_bounded_by_max_connections(inbox: Inbox, connects: list[str]) -> None:
    configure(max_connections=3)
    published: list[str] = []

    def work(thread: int) -> None:
        for n in range(25):
            published.append(publish_domain_event(inbox.key, {"t": thread, "n": n}).uuid_string)

    run_threads(12, work)
    assert 1 <= len(connects) <= 3
    assert sum(pool.size for pool in publish_module._shared.values()) == len(connects)
    inbox.wait(300)
    inbox.take()
    assert sorted(e.uuid_string for e in inbox.events()) == sorted(published)


def test_threads_wait_for_a_free_connection_at_most_the_timeout(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(max_connections=1, timeout=0.5)
    release = threading.Event()
    real = BlockingChannel.basic_publish

    def held(self: BlockingChannel, *args: Any, **kwargs: Any) -> None:
        release.wait(10)
        real(self, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "basic_publish", held)
    first = threading.Thread(target=publish_domain_event, args=(inbox.key, {"first": True}))
    first.start()
    try:
        wait_for(
            lambda: any(pool.size for pool in publish_module._shared.values()),
            message="the first publish to take the only connection",
        )
        with pytest.raises(BrokerUnavailableError, match="max_connections"):
            publish_domain_event(inbox.key, {"second": True})
    finally:
        release.set()
        first.join(timeout=10)
    assert len(inbox.wait(1)) == 1


def test_a_timeout_changed_at_run_time_leaks_no_connection(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23, item 21: max_connections is per broker URL, whatever the
    timeout; the connections opened with an old timeout are closed."""
    opened: list[pika.BlockingConnection] = []
    real = link_module.connect

    def spy(config: Any, name: str, **kwargs: Any) -> pika.BlockingConnection:
        connection = real(config, name, **kwargs)
        if "publisher" in name:
            opened.append(connection)
        return connection

    monkeypatch.setattr(link_module, "connect", spy)
    configure(max_connections=2)
    published = 0

    def work(thread: int) -> None:
        nonlocal published
        for n in range(10):
            configure(timeout=5 + (thread * 10 + n) / 100)
            publish_domain_event(inbox.key, {"t": thread, "n": n})
            published += 1

    work(0)  # 10 timeouts one after the other
    assert sum(connection.is_open for connection in opened) <= 1
    run_threads(3, work)  # 30 more, by threads publishing at the same time
    assert len(publish_module._shared) == 1
    assert sum(connection.is_open for connection in opened) <= 2
    assert len(inbox.wait(published)) == published == 40


@pytest.mark.parametrize("value", [0, -1, 1.5, "4", True, None])
def test_max_connections_must_be_a_positive_int(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_connections"):
        configure(max_connections=value)


def test_a_connection_lost_by_one_thread_does_not_disturb_the_others(
    inbox: Inbox, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:  # the connects spy stays
        barrier = concurrent_publishes(patch, 2)
        run_threads(2, lambda n: publish_domain_event(inbox.key, {"n": n}))
    pool = next(iter(publish_module._shared.values()))
    victim = pool._idle[0]
    assert victim._sender is not None and victim._sender.link.connection is not None
    victim._sender.link.connection.close()  # behind its back
    assert barrier.broken is False
    run_threads(4, lambda n: [publish_domain_event(inbox.key, {"n": n}) for _ in range(5)])
    assert len(inbox.wait(22)) == 22
    assert len(connects) <= 5  # the two, one reopened, at most two more


# -- fork -------------------------------------------------------------------------------------


def run_in_child(action: Callable[[], str]) -> str:
    """Fork; run ``action`` in the child, then what a normal exit runs
    (atexit handlers); return what ``action`` returned. Fails if it raised."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when forking with threads alive (e.g. a lingering
        # thread of another test); a wedged child is caught by the bound below.
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, action().encode("utf-8"))
            atexit._run_exitfuncs()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    try:

        def reaped() -> tuple[int] | None:
            done, status = os.waitpid(pid, os.WNOHANG)
            return (status,) if done else None

        (status,) = wait_for(reaped, timeout=30, message="the child to exit")
        output = os.read(read_end, 1000).decode("utf-8")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed (see its stderr)"
    return output


@pytest.mark.timeout(60)  # a child writing on the parent's socket can wedge it
@pytest.mark.parametrize("child_publishes", [True, False])
def test_fork_child_publishes_on_its_own_connection(
    inbox: Inbox, connects: list[str], child_publishes: bool
) -> None:
    before = publish_domain_event(inbox.key, {"who": "parent, before the fork"})
    assert len(connects) == 1

    def child() -> str:
        if not child_publishes:
            return ""
        return publish_domain_event(inbox.key, {"who": "child"}).uuid_string

    child_uuid = run_in_child(child)

    # The parent's connection survived the child (had the child written on
    # its socket, e.g. closing it at exit, the broker would have closed it
    # and the parent would have to reconnect).
    after = publish_domain_event(inbox.key, {"who": "parent, after the fork"})
    assert len(connects) == 1
    expected = {before.uuid_string, after.uuid_string} | ({child_uuid} if child_uuid else set())
    inbox.wait(len(expected))
    inbox.take()
    assert sorted(e.uuid_string for e in inbox.events()) == sorted(expected)


@pytest.mark.timeout(60)
def test_fork_with_an_explicit_publisher(inbox: Inbox, connects: list[str]) -> None:
    with Publisher() as publisher:
        publisher.publish_event(DomainEvent(inbox.key, {"who": "parent"}))

        def child() -> str:
            event = publisher.publish_event(DomainEvent(inbox.key, {"who": "child"}))
            publisher.close()  # closes the child's connection only
            return event.uuid_string

        child_uuid = run_in_child(child)
        publisher.publish_event(DomainEvent(inbox.key, {"who": "parent again"}))
        assert len(connects) == 1
    inbox.wait(3)
    assert child_uuid in {e.uuid_string for e in inbox.events()}


# -- bad input: refused before anything is sent ------------------------------------------

BAD_ROUTING_KEYS = ["", None, 5, b"user.registered", "k" * 256, "é" * 128]


@pytest.mark.parametrize("routing_key", BAD_ROUTING_KEYS)
def test_bad_routing_key_raises_value_error_and_sends_nothing(
    routing_key: Any, broker_url: str, connects: list[str], sent: list[dict[str, Any]]
) -> None:
    with pytest.raises(ValueError, match="routing_key"):
        publish_domain_event(routing_key, {})
    with Publisher() as publisher:
        with pytest.raises(ValueError, match="routing_key"):
            publisher.publish("{}", routing_key)
        with pytest.raises(ValueError, match="routing_key"):
            publisher.publish_event(DomainEvent(routing_key))
    assert connects == []
    assert sent == []


def test_routing_key_of_exactly_255_bytes_is_accepted(
    channel: BlockingChannel, names: Names
) -> None:
    queue = names.new("test-publish")
    key = (queue + ".") + "k" * (255 - len(queue) - 1)
    assert len(key.encode("utf-8")) == 255
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, EXCHANGE, routing_key=key)
    event = publish_domain_event(key, {})
    inbox = Inbox(channel, queue)
    ((method, _, _),) = inbox.wait(1)
    assert method.routing_key == key == event.routing_key


class Unserializable:
    pass


def circular() -> dict[str, Any]:
    data: dict[str, Any] = {}
    data["self"] = data
    return data


@pytest.mark.parametrize(
    "data", [Unserializable(), {"when": {1, 2}}, {"raw": b"bytes"}, circular()]
)
def test_unserializable_data_raises_type_error_and_sends_nothing(
    inbox: Inbox, data: Any, connects: list[str], sent: list[dict[str, Any]]
) -> None:
    with pytest.raises(TypeError):
        publish_domain_event(inbox.key, data)
    with Publisher() as publisher, pytest.raises(TypeError):
        publisher.publish_event(DomainEvent(inbox.key, data))
    assert connects == []
    assert sent == []
    assert inbox.ready() == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://guest:guest@localhost:5672/",
        "amqp://guest:guest@localhost:port/",
        "amqp://guest:gu/est@localhost/",
        "amqp://guest:guest@localhost/?heartbeat=x",
        ["amqp://guest:guest@localhost/", 1],
    ],
)
def test_malformed_url_raises_configuration_error_and_sends_nothing(
    url: Any, connects: list[str], sent: list[dict[str, Any]]
) -> None:
    with pytest.raises(ConfigurationError):
        publish_domain_event("a.b", {}, connection_settings=url)
    with pytest.raises(ConfigurationError):
        Publisher(url)
    assert connects == []
    assert sent == []


# -- no broker at all -------------------------------------------------------------------------


def test_none_needs_no_broker(
    monkeypatch: pytest.MonkeyPatch,
    connects: list[str],
    pika_connections: list[pika.ConnectionParameters],
) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, DEAD_URL)
    event = publish_domain_event("a.b", {"x": 1}, connection_settings=None)
    assert event.routing_key == "a.b"
    assert event.data == {"x": 1}

    with Publisher(None) as publisher:
        assert publisher.connection is None
        assert publisher.channel is None
        assert publisher.connection_settings is None
        publisher.connect()
        publisher.publish("{}", "a.b")
        assert publisher.publish_event(event) is event
        publisher.disconnect()
    assert "no broker" in repr(publisher)
    assert connects == []
    assert pika_connections == []  # not even an attempt at the URL in the environment


def test_configure_none_disables_publishing(
    monkeypatch: pytest.MonkeyPatch, connects: list[str]
) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    configure(broker=None)
    assert publish_domain_event("a.b", {}).routing_key == "a.b"
    assert connects == []


def test_none_still_validates_input() -> None:
    with pytest.raises(ValueError):
        publish_domain_event("", {}, connection_settings=None)
    with pytest.raises(TypeError):
        publish_domain_event("a.b", object(), connection_settings=None)


# -- unreachable broker, several URLs, authentication -------------------------------------------


def test_unreachable_broker_fails_within_the_configured_bound(
    virtual_clock: VirtualClock,
) -> None:
    configure(timeout=1.5)
    with pytest.raises(BrokerUnavailableError) as info:
        publish_domain_event("a.b", {}, connection_settings=DEAD_URL)
    # Retried (with pauses), until the bound and never past it.
    assert 1.5 / 2 < virtual_clock.now < 1.5, virtual_clock.sleeps
    assert isinstance(info.value, BrokerError)
    assert isinstance(info.value.__cause__, (pika.exceptions.AMQPError, OSError))
    assert "127.0.0.1:1" in str(info.value)


def test_unreachable_broker_with_a_publisher_timeout(virtual_clock: VirtualClock) -> None:
    publisher = Publisher(DEAD_URL, timeout=0.5)
    with pytest.raises(BrokerUnavailableError) as info:
        publisher.publish("{}", "a.b")
    assert 0.5 / 2 < virtual_clock.now < 0.5, virtual_clock.sleeps
    assert info.value.__cause__ is not None
    with pytest.raises(BrokerUnavailableError):
        publisher.connect()


def test_list_of_urls_tried_in_turn(
    inbox: Inbox, broker_url: str, pika_connections: list[pika.ConnectionParameters]
) -> None:
    before = len(pika_connections)
    event = publish_domain_event(inbox.key, {}, connection_settings=[DEAD_URL, broker_url])
    # The dead node once, then at once the next one (not the dead one again
    # until the deadline).
    tried = [(params.host, params.port) for params in pika_connections[before:]]
    broker = pika.URLParameters(broker_url)
    assert tried == [("127.0.0.1", 1), (broker.host, broker.port)]
    with Publisher(f"{DEAD_URL}, {broker_url}") as publisher:
        publisher.publish_event(DomainEvent(inbox.key, {"n": 2}))
    inbox.wait(2)
    assert event.uuid_string in {e.uuid_string for e in inbox.events()}


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:wrong-password@{host}/%2F",
        "amqp://no-such-user-{uid}:pw@{host}/%2F",
        "amqp://guest:guest@{host}/no-such-vhost-{uid}",
    ],
)
def test_authentication_failure_is_raised_at_once(
    broker_url: str, url: str, pika_connections: list[pika.ConnectionParameters]
) -> None:
    host = broker_url.split("@")[-1].split("/")[0]
    url = url.format(host=host, uid=uuid.uuid4().hex[:8])
    with pytest.raises(AuthenticationError) as info:
        publish_domain_event("a.b", {}, connection_settings=url)
    assert len(pika_connections) == 1  # not retried until the 30 s deadline
    assert isinstance(info.value, BrokerError)
    assert isinstance(info.value.__cause__, pika.exceptions.AMQPError)


# -- passwords -------------------------------------------------------------------------------------


def assert_secret_hidden(secret: str, exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    assert secret not in shown
    assert secret not in repr(exc)
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage()


def test_password_never_in_repr_error_or_log(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex}"

    dead = Publisher(f"amqp://guest:{secret}@127.0.0.1:1/%2F", timeout=0.5)
    assert secret not in repr(dead)
    assert secret not in str(dead.connection_settings)
    with pytest.raises(BrokerUnavailableError) as unreachable:
        dead.publish("{}", "a.b")
    assert_secret_hidden(secret, unreachable.value, caplog)

    host = broker_url.split("@")[-1]
    refused = Publisher(f"amqp://guest:{secret}@{host}")
    assert secret not in repr(refused)
    with pytest.raises(AuthenticationError) as auth:
        refused.publish("{}", "a.b")
    assert_secret_hidden(secret, auth.value, caplog)

    with pytest.raises(ConfigurationError) as malformed:
        Publisher(f"amqp://guest:{secret}/x@{host}")
    assert_secret_hidden(secret, malformed.value, caplog)
    assert caplog.records  # the debug logging did run


# -- Publisher: context manager, close, reconnect, lazy properties ---------------------------------


def test_publisher_context_manager_publishes_persistently_and_closes(inbox: Inbox) -> None:
    with Publisher() as publisher:
        publisher.publish('{"raw": "str"}', inbox.key)
        publisher.publish(b'{"raw": "bytes"}', inbox.key)
        connection = publisher.connection
        assert connection is not None
        assert connection.is_open
    assert not connection.is_open
    messages = inbox.wait(2)
    assert [body for _, _, body in messages] == [b'{"raw": "str"}', b'{"raw": "bytes"}']
    assert all(properties.delivery_mode == 2 for _, properties, _ in messages)


def test_publish_with_own_properties(inbox: Inbox) -> None:
    with Publisher() as publisher:
        properties = pika.BasicProperties(delivery_mode=2, headers={"x-mine": "yes"})
        publisher.publish(b"{}", inbox.key, properties=properties)
        publisher.publish_event(DomainEvent(inbox.key), headers={"x-trace": "abc"})
    (_, first, _), (_, second, _) = inbox.wait(2)
    assert first.headers == {"x-mine": "yes"}
    assert second.headers == {"x-trace": "abc"}
    assert second.content_type == "application/json"


def test_close_and_disconnect_then_publish_again(inbox: Inbox, connects: list[str]) -> None:
    publisher = Publisher()
    publisher.publish("{}", inbox.key)
    first = publisher.connection
    publisher.close()
    assert first is not None
    assert not first.is_open
    publisher.publish("{}", inbox.key)  # reconnects
    second = publisher.connection
    publisher.disconnect()
    assert second is not None
    assert not second.is_open
    publisher.close()  # closing twice is fine
    assert len(connects) == 2
    assert len(inbox.wait(2)) == 2


def test_reconnects_after_its_connection_was_closed_under_it(
    inbox: Inbox, connects: list[str]
) -> None:
    with Publisher() as publisher:
        publisher.publish("{}", inbox.key)
        connection = publisher.connection
        assert connection is not None
        connection.close()  # behind the publisher's back
        publisher.publish("{}", inbox.key)
        assert publisher.connection is not connection
    assert len(connects) == 2
    assert len(inbox.wait(2)) == 2


def broker_side_connections() -> list[tuple[str, str]]:
    """(pid, peer_port) of every connection, from rabbitmqctl."""
    return [(row[0], row[1]) for row in rabbitmqctl_rows("connections", "pid", "peer_port")]


def broker_connection_state(broker_pid: str) -> str | None:
    """The state rabbitmqctl shows for one connection (None: gone)."""
    for row in rabbitmqctl_rows("connections", "pid", "state"):
        if row[0] == broker_pid:
            return row[1]
    return None


@pytest.mark.skipif(shutil.which(rabbitmqctl_command()[0]) is None, reason="needs rabbitmqctl")
def test_reconnects_after_the_broker_closed_its_connection(
    inbox: Inbox, connects: list[str]
) -> None:
    before = {port for _, port in broker_side_connections()}
    with Publisher() as publisher:
        publisher.publish("{}", inbox.key)
        # Our connection is the one that appeared (tests run one at a time).
        [(broker_pid, _)] = [
            (pid, port) for pid, port in broker_side_connections() if port not in before
        ]
        subprocess.run(
            [*rabbitmqctl_command(), "-q", "close_connection", broker_pid, "test: closing my own"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        # Once the broker no longer lists it as running, it has sent its
        # Connection.Close; the publisher has not read it yet and finds out
        # when it publishes.
        wait_for(
            lambda: broker_connection_state(broker_pid) != "running",
            timeout=30,
            message="the broker to close the connection",
        )
        publisher.publish("{}", inbox.key)
    assert len(connects) == 2
    assert len(inbox.wait(2)) == 2


def test_failure_right_after_connecting_is_retried(
    inbox: Inbox, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = BlockingChannel.confirm_delivery
    failures = [pika.exceptions.StreamLostError("test: lost right after connecting")]

    def flaky(self: BlockingChannel) -> None:
        if failures:
            raise failures.pop()
        real(self)

    monkeypatch.setattr(BlockingChannel, "confirm_delivery", flaky)
    publish_domain_event(inbox.key, {})
    assert failures == []
    assert len(connects) == 2
    assert len(inbox.wait(1)) == 1


def test_pika_errors_from_the_properties_are_translated(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: BlockingChannel) -> None:
        raise pika.exceptions.StreamLostError("test: lost")

    monkeypatch.setattr(BlockingChannel, "confirm_delivery", broken)
    publisher = Publisher()
    with pytest.raises(BrokerUnavailableError) as info:
        publisher.channel  # noqa: B018
    assert isinstance(info.value.__cause__, pika.exceptions.StreamLostError)


@pytest.fixture
def tarpit() -> Iterator[str]:
    """A URL whose port accepts TCP connections but never speaks AMQP."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/%2F"


def test_a_node_that_never_answers_is_skipped_for_the_next(
    inbox: Inbox, tarpit: str, broker_url: str
) -> None:
    with Publisher([tarpit, broker_url], timeout=5) as publisher:
        publisher.publish("{}", inbox.key)
    assert len(inbox.wait(1)) == 1


def test_a_node_that_never_answers_fails_with_a_library_error(
    tarpit: str, pika_connections: list[pika.ConnectionParameters]
) -> None:
    with pytest.raises(BrokerUnavailableError):
        Publisher(tarpit, timeout=1).publish("{}", "a.b")
    # pika waits for a silent node as long as it is told: never longer than
    # the time left (pika's own defaults are 10 s and 15 s).
    assert pika_connections
    for params in pika_connections:
        assert params.socket_timeout <= 1
        assert params.stack_timeout <= 1


def test_connection_and_channel_connect_lazily(connects: list[str], broker_url: str) -> None:
    publisher = Publisher()
    assert connects == []  # no I/O in __init__
    channel = publisher.channel
    assert channel is not None
    assert channel.is_open
    connection = publisher.connection
    assert connection is not None
    assert channel.connection is connection
    assert publisher.channel is channel
    assert len(connects) == 1
    publisher.close()
    assert not channel.is_open
    assert publisher.connection is not connection  # reopened on access
    assert len(connects) == 2
    publisher.close()


def test_302_cleanup_pattern_channel_queue_delete(channel: BlockingChannel, names: Names) -> None:
    queue = names.new("test-publish")
    channel.queue_declare(queue, durable=True)
    with Publisher() as publisher:
        assert publisher.channel is not None
        publisher.channel.queue_delete(queue)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        channel.queue_declare(queue, passive=True)


def test_custom_exchange_is_declared_durable(channel: BlockingChannel, names: Names) -> None:
    exchange = names.new("test-exchange")
    names.exchanges.append(exchange)
    with Publisher(exchange=exchange, exchange_type="fanout") as publisher:
        publisher.connect()
    channel.exchange_declare(exchange, passive=True)  # it exists (404 otherwise)
    # Declaring it again as a durable fanout must not raise PRECONDITION_FAILED
    # (it would, had it been declared non-durable or of another type).
    channel.exchange_declare(exchange, exchange_type="fanout", durable=True)


def test_exchange_declared_with_another_type_is_a_publish_error(
    channel: BlockingChannel, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange = names.new("test-exchange")
    names.exchanges.append(exchange)
    channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
    publisher = Publisher(exchange=exchange, exchange_type="topic")
    declared: list[str] = []
    real = BlockingChannel.exchange_declare

    def spy(self: BlockingChannel, exchange: str, *args: Any, **kwargs: Any) -> Any:
        declared.append(exchange)
        return real(self, exchange, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "exchange_declare", spy)
    with pytest.raises(PublishError, match="406") as info:
        publisher.publish("{}", "a.b")
    assert declared == [exchange]  # not retried: it cannot get better
    assert isinstance(info.value.__cause__, pika.exceptions.ChannelClosedByBroker)
    with pytest.raises(PublishError):
        publisher.connect()


def test_recovers_when_its_exchange_was_deleted(
    channel: BlockingChannel, names: Names, connects: list[str]
) -> None:
    exchange = names.new("test-exchange")
    names.exchanges.append(exchange)
    with Publisher(exchange=exchange) as publisher:
        publisher.publish("{}", "a.b")
        channel.exchange_delete(exchange)
        publisher.publish("{}", "a.b")  # declares it again on a new channel
        inbox = make_inbox(channel, names, exchange)
        publisher.publish("{}", inbox.key)
    assert len(inbox.wait(1)) == 1


def test_repr_shows_where_but_no_password(broker_url: str) -> None:
    publisher = Publisher("amqp://user:hidden-pw@example.invalid/%2F", exchange="x")
    assert repr(publisher) == "<Publisher amqp://user:***@example.invalid/%2F exchange='x'>"


def test_environment_variable_is_used_by_default(
    monkeypatch: pytest.MonkeyPatch, connects: list[str]
) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, DEAD_URL)
    configure(broker=BROKER_URL, timeout=0.5)
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
        publish_domain_event("a.b", {})
    assert connects


def test_the_broker_file_is_followed_from_one_publish_to_the_next(
    inbox: Inbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # The variables win over configure(): this test sets them itself.
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    configure(broker=BROKER_URL, timeout=0.5)
    publish_domain_event(inbox.key, {"n": 1})  # the configured broker, remembered
    secret = tmp_path / "broker-url"
    secret.write_text(f"{DEAD_URL}\n")
    monkeypatch.setenv(FILE_ENVIRONMENT_VARIABLE, str(secret))
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
        publish_domain_event(inbox.key, {"n": 2})
    secret.write_text(f"# rotated\n{BROKER_URL}\n")
    publish_domain_event(inbox.key, {"n": 3})
    secret.write_text(f"{DEAD_URL}\n")
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
        publish_domain_event(inbox.key, {"n": 4})
    monkeypatch.delenv(FILE_ENVIRONMENT_VARIABLE)
    publish_domain_event(inbox.key, {"n": 5})  # the configured broker again
    assert [event.data["n"] for event in _events(inbox.wait(3))] == [1, 3, 5]


def _events(messages: list[Message]) -> list[DomainEvent]:
    return [DomainEvent.from_json(body) for _, _, body in messages]


def test_changed_defaults_apply_to_the_next_publish(
    inbox: Inbox, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment variable wins over configure(): this test sets it itself.
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    configure(broker=BROKER_URL)
    publish_domain_event(inbox.key, {"n": 1})  # the configured broker, remembered
    configure(broker=None)
    publish_domain_event(inbox.key, {"n": 2})  # sent nowhere
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, DEAD_URL)  # the variable wins over configure()
    configure(timeout=0.5)
    with pytest.raises(BrokerUnavailableError):
        publish_domain_event(inbox.key, {"n": 3})
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    urls = [BROKER_URL]
    configure(broker=urls, timeout=5)
    publish_domain_event(inbox.key, {"n": 4})
    urls[0] = DEAD_URL  # a list changed after configure() is not missed
    with pytest.raises(BrokerUnavailableError):
        publish_domain_event(inbox.key, {"n": 5})
    inbox.wait(2)
    inbox.take()
    assert [e.data["n"] for e in inbox.events()] == [1, 4]


@pytest.mark.timeout(60)
def test_fork_child_starts_with_an_empty_pool(
    inbox: Inbox, connects: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:  # the connects spy stays
        concurrent_publishes(patch, 3)
        run_threads(3, lambda n: publish_domain_event(inbox.key, {"who": "parent", "n": n}))
    assert len(connects) == 3

    def child() -> str:
        assert publish_module._shared == {}  # nothing of the parent's is used
        event = publish_domain_event(inbox.key, {"who": "child"})
        (pool,) = publish_module._shared.values()
        return f"{event.uuid_string} {pool.size}"

    child_uuid, child_pool_size = run_in_child(child).split()
    assert child_pool_size == "1"
    run_threads(3, lambda n: publish_domain_event(inbox.key, {"who": "parent again"}))
    assert len(connects) == 3  # the parent's connections survived the child
    inbox.wait(7)
    assert child_uuid in {e.uuid_string for e in inbox.events()}
