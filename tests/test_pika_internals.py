"""The one door to pika's internals (``_amqp/pika_internals.py``): its check
at import, and the package's paths on pika's own code when the fast paths
are off.

Broker-free: the installed pika has everything the fast paths rely on; a
name or call shape taken away means one WARNING and pika's paths; the
environment variable turns them off. Against the broker, each path runs
both ways (``paths``): publishing, batches, consuming, a lost connection,
a channel the broker closed, and dropping a connection that does not answer.
(``make unit-pika-paths`` runs the whole suite with the fast paths off.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pika
import pika.channel
import pika.connection
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from domain_event_broker import (
    BatchPublishError,
    DomainEvent,
    Publisher,
    PublishError,
    Subscriber,
    UnroutableError,
)
from domain_event_broker._amqp import config as _config
from domain_event_broker._amqp import pika_internals
from domain_event_broker._amqp.link import Link
from domain_event_broker._amqp.session import connection_info
from domain_event_broker._subscribing import consume_loop

from .conftest import Names
from .faults.proxy import TcpProxy
from .helpers import BROKER_URL, queue_size, wait_for
from .test_subscriber import consume_until

PIKA_PATHS_OFF = os.environ.get(pika_internals.ENVIRONMENT_VARIABLE, "").strip().lower() in {
    "0",
    "false",
    "no",
    "off",
}


@pytest.fixture
def decision() -> Iterator[None]:
    """Restores the module's switch after a test that re-runs the check."""
    saved = pika_internals.FAST_PATHS_ACTIVE, pika_internals.FAST_PATHS_REASON
    yield
    pika_internals.FAST_PATHS_ACTIVE, pika_internals.FAST_PATHS_REASON = saved


@pytest.fixture(params=["fast", "pika"])
def paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the fast paths on ("fast") and off ("pika")."""
    if request.param == "pika":
        monkeypatch.setattr(pika_internals, "FAST_PATHS_ACTIVE", False)
        monkeypatch.setattr(pika_internals, "FAST_PATHS_REASON", "turned off by the test")
    elif not pika_internals.FAST_PATHS_ACTIVE:
        pytest.skip(f"pika's fast paths are off: {pika_internals.FAST_PATHS_REASON}")
    return str(request.param)


# -- the check at import (no broker) -----------------------------------------------------


def test_the_installed_pika_has_everything_the_fast_paths_rely_on() -> None:
    assert pika.__version__.startswith(("1.3.", "1.4.")), pika.__version__
    assert pika_internals.mismatches() == []
    if PIKA_PATHS_OFF:
        assert not pika_internals.FAST_PATHS_ACTIVE
        assert pika_internals.ENVIRONMENT_VARIABLE in pika_internals.FAST_PATHS_REASON
    else:
        assert pika_internals.FAST_PATHS_ACTIVE, pika_internals.FAST_PATHS_REASON
        assert pika_internals.FAST_PATHS_REASON == ""


def _owner_and_name(target: str) -> tuple[Any, str]:
    """Where ``target``'s last part is defined (a module, or the class in the
    MRO that defines it), and that part."""
    owner_path, name = target.rsplit(".", 1)
    owner = pika_internals._resolve(owner_path)
    for klass in getattr(owner, "__mro__", ()):
        if name in vars(klass):
            return klass, name
    return owner, name


@pytest.mark.parametrize(
    "check",
    [check for check in pika_internals.CHECKS if check.kind != "stored"],
    ids=lambda check: check.describe(),
)
def test_each_name_relied_on_is_checked(
    check: pika_internals.Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, name = _owner_and_name(check.target)
    monkeypatch.delattr(owner, name)
    assert check.describe() in pika_internals.mismatches()


def test_a_changed_call_shape_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    def basic_publish(  # a new keyword: the shape relied on is gone
        self: Any, exchange: str, routing_key: str, body: bytes, properties: Any = None
    ) -> None:
        pass

    monkeypatch.setattr(pika.channel.Channel, "basic_publish", basic_publish)
    assert pika_internals.mismatches() == [
        "pika.channel.Channel.basic_publish"
        "(self, exchange, routing_key, body, properties=, mandatory=)"
    ]


def test_an_attribute_pika_no_longer_sets_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    original = BlockingChannel.__init__

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:  # sets nothing itself
        original(self, *args, **kwargs)

    monkeypatch.setattr(BlockingChannel, "__init__", wrapped)
    assert {
        f"pika.adapters.blocking_connection.BlockingChannel.{name} (set in __init__)"
        for name in ("_impl", "_consumer_infos", "_closing_reason")
    } <= set(pika_internals.mismatches())


def test_attributes_set_in_a_method_init_calls_count() -> None:
    # pika sets bytes_sent in _init_connection_state(), which __init__ calls.
    assert pika_internals._stored_in_init(pika.connection.Connection, "bytes_sent")
    assert not pika_internals._stored_in_init(pika.connection.Connection, "_no_such_name")


def test_a_mismatch_means_one_warning_and_pikas_paths_everywhere(
    decision: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pika.adapters.utils.io_services_utils import _AsyncTransportBase

    monkeypatch.delenv(pika_internals.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.delattr(_AsyncTransportBase, "_STATE_ACTIVE")  # the read loop would spin
    caplog.set_level(logging.DEBUG, logger=pika_internals.__name__)

    assert pika_internals.decide_fast_paths() is False

    records = [r for r in caplog.records if r.name == pika_internals.__name__]
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert f"pika {pika.__version__}" in message
    assert "_AsyncPlaintextTransport._STATE_ACTIVE" in message
    assert not pika_internals.FAST_PATHS_ACTIVE
    assert "_STATE_ACTIVE" in pika_internals.FAST_PATHS_REASON
    # Every function takes its fallback without touching pika's objects.
    untouchable = SimpleNamespace()
    assert pika_internals.lean_io(untouchable) is untouchable  # type: ignore[arg-type]
    assert pika_internals.deliver_as_read(untouchable, "tag") is False  # type: ignore[arg-type]
    assert pika_internals.pipeline(untouchable, print, print) is None  # type: ignore[arg-type]
    assert pika_internals.closing_reason(untouchable) is None  # type: ignore[arg-type]
    assert pika_internals.abort_connection(untouchable, "x") is False  # type: ignore[arg-type]
    assert pika_internals.ssl_socket(untouchable) is None  # type: ignore[arg-type]


def _import_in_a_subprocess(
    prelude: str = "", **environment: str
) -> subprocess.CompletedProcess[str]:
    script = (
        "import json, logging\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(name)s %(message)s')\n"
        f"{prelude}\n"
        "from domain_event_broker._amqp import pika_internals as p\n"
        "print(json.dumps([p.FAST_PATHS_ACTIVE, p.FAST_PATHS_REASON]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != pika_internals.ENVIRONMENT_VARIABLE}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_the_environment_variable_turns_every_fast_path_off(value: str) -> None:
    done = _import_in_a_subprocess(**{pika_internals.ENVIRONMENT_VARIABLE: value})
    active, reason = json.loads(done.stdout)
    assert active is False
    assert pika_internals.ENVIRONMENT_VARIABLE in reason
    assert "WARNING" not in done.stderr


def test_the_check_runs_at_import() -> None:
    on = _import_in_a_subprocess(**{pika_internals.ENVIRONMENT_VARIABLE: "1"})
    assert json.loads(on.stdout) == [True, ""]
    assert "WARNING" not in on.stderr
    missing = _import_in_a_subprocess(
        "from pika.adapters.utils import io_services_utils as io\n"
        "del io._AsyncTransportBase._MAX_RECV_BYTES"
    )
    active, reason = json.loads(missing.stdout)
    assert active is False
    assert "_MAX_RECV_BYTES" in reason
    warnings = [line for line in missing.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, missing.stderr
    assert f"pika {pika.__version__}" in warnings[0]


# -- the package's paths, with and without the fast paths (broker) ------------------------

EXCHANGE = "domain-events"


@pytest.fixture
def queue(channel: BlockingChannel, names: Names) -> str:
    """A queue bound to the events exchange with ``<name>.#``; its name."""
    name = names.new("test-door")
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    channel.queue_declare(name, durable=True)  # RabbitMQ 4.3 refuses transient ones
    channel.queue_bind(name, EXCHANGE, routing_key=f"{name}.#")
    return name


def _take(channel: BlockingChannel, queue: str, count: int) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []

    def enough() -> bool:
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return len(bodies) >= count
            bodies.append(json.loads(body))

    wait_for(enough, message=f"{count} messages in {queue}")
    return bodies


def test_publish(paths: str, channel: BlockingChannel, queue: str) -> None:
    events = [DomainEvent(f"{queue}.happened", {"n": n, "pad": "x" * n * 1000}) for n in range(50)]
    with Publisher(BROKER_URL) as publisher:
        connection = publisher.connection
        assert connection is not None
        for event in events:
            publisher.publish_event(event)
        replaced = "_output_marshaled_frames" in vars(connection._impl)
    assert replaced is (paths == "fast")
    bodies = _take(channel, queue, len(events))
    assert [b["uuid_string"] for b in bodies] == [e.uuid_string for e in events]


def test_publish_many(paths: str, channel: BlockingChannel, names: Names) -> None:
    # An exchange of its own: on the shared broker a queue may bind "#" to
    # domain-events, and then no key is unroutable there.
    exchange = names.new("test-door-exchange")
    names.exchanges.append(exchange)
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    queue, full = names.new("test-door"), names.new("test-door-full")
    channel.queue_declare(queue, durable=True)  # RabbitMQ 4.3 refuses transient ones
    channel.queue_bind(queue, exchange, routing_key=f"{queue}.#")
    # At most 2 messages: the broker refuses (nacks) more.
    channel.queue_declare(
        full, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    channel.queue_bind(full, exchange, routing_key=f"{full}.#")

    events = [DomainEvent(f"{queue}.happened", {"n": n}) for n in range(1200)]
    with Publisher(BROKER_URL, exchange=exchange) as publisher:
        assert publisher.publish_many(events) == events
        batch = publisher._sender._batch  # type: ignore[union-attr]
        assert batch is not None
        assert (batch._pipeline is not None) is (paths == "fast")

        nowhere = DomainEvent(f"nowhere-{names.new()}.happened", {})
        with pytest.raises(BatchPublishError) as info:
            publisher.publish_many([events[0], nowhere], require_route=True)
        ((failed, cause),) = info.value.failed
        assert failed is nowhere
        assert isinstance(cause, UnroutableError)

        some = [DomainEvent(f"{full}.happened", {"n": n}) for n in range(4)]
        with pytest.raises(BatchPublishError) as info:
            publisher.publish_many(some)
        assert info.value.confirmed == some[:2]
        assert [event for event, _ in info.value.failed] == some[2:]
        assert all(
            isinstance(cause, PublishError) and "nacked" in str(cause)
            for _, cause in info.value.failed
        )
    bodies = _take(channel, queue, len(events) + 1)
    assert [b["uuid_string"] for b in bodies] == [e.uuid_string for e in [*events, events[0]]]


def test_consume(paths: str, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    queued: list[object] = []
    original = BlockingChannel._on_consumer_message_delivery

    def counting(self: BlockingChannel, *args: Any) -> None:
        queued.append(args)
        original(self, *args)

    monkeypatch.setattr(BlockingChannel, "_on_consumer_message_delivery", counting)
    name = names.new("test-door-consume")
    handled: list[int] = []
    subscriber = Subscriber(BROKER_URL)
    subscriber.register(lambda event: handled.append(event.data["n"]), name, [f"{name}.k"])
    with Publisher(BROKER_URL) as publisher:
        publisher.publish_many([DomainEvent(f"{name}.k", {"n": n}) for n in range(300)])
    consume_until(subscriber, lambda: len(handled) == 300)
    subscriber.close()
    assert sorted(handled) == list(range(300))
    assert queue_size(name) == 0
    # pika's own dispatch queues each delivery; the fast path hands it over as read.
    assert (len(queued) >= 300) is (paths == "pika"), len(queued)


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_url(broker_url) as tcp_proxy:
        yield tcp_proxy


def test_connection_loss(paths: str, names: Names, proxy: TcpProxy) -> None:
    name = names.new("test-door-loss")
    handled: list[int] = []
    subscriber = Subscriber(proxy.url(BROKER_URL))
    subscriber.register(lambda event: handled.append(event.data["n"]), name, [f"{name}.k"])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            subscriber.start_consuming(timeout=60)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with Publisher(proxy.url(BROKER_URL), timeout=20) as publisher:
            publisher.publish_many([DomainEvent(f"{name}.k", {"n": n}) for n in range(10)])
            wait_for(lambda: len(handled) >= 10, timeout=20)
            assert proxy.cut() >= 2  # the subscriber's and the publisher's
            publisher.publish_many([DomainEvent(f"{name}.k", {"n": n}) for n in range(10, 20)])
            publisher.publish_event(DomainEvent(f"{name}.k", {"n": 20}))
        wait_for(lambda: set(handled) >= set(range(21)), timeout=30)
    finally:
        subscriber.stop_consuming()
        thread.join(timeout=30)
        subscriber.close()
    assert not thread.is_alive()
    assert errors == []
    assert proxy.accepted >= 4  # both reconnected


def test_publish_many_on_a_silent_wire(
    paths: str, channel: BlockingChannel, queue: str, proxy: TcpProxy
) -> None:
    """A broker that stops answering is noticed by the heartbeat on both
    paths; the batch goes out on a new connection."""
    with Publisher(proxy.url(BROKER_URL, heartbeat="1"), timeout=20) as publisher:
        publisher.publish_many([DomainEvent(f"{queue}.happened", {"n": 0})])
        proxy.freeze()  # a black hole: nothing goes through, nothing is closed
        events = [DomainEvent(f"{queue}.happened", {"n": n}) for n in range(1, 6)]
        started = time.monotonic()
        assert publisher.publish_many(events) == events
        elapsed = time.monotonic() - started
    assert elapsed < 15, elapsed
    assert proxy.accepted == 2
    uuids = {b["uuid_string"] for b in _take(channel, queue, 6)}
    assert uuids >= {e.uuid_string for e in events}


def test_a_channel_the_broker_closed(paths: str, names: Names) -> None:
    link = Link(_config.resolve(BROKER_URL), "test-door")  # type: ignore[arg-type]
    try:
        channel = link.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            channel.queue_declare(names.new("missing"), passive=True)
        reason = link.closing_reason()
        if paths == "fast":
            assert isinstance(reason, pika.exceptions.ChannelClosedByBroker)
            assert reason.reply_code == 404
        else:
            assert reason is None  # pika keeps it to itself
        # The consuming loop notices the closed channel either way.
        with pytest.raises(
            (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ChannelWrongStateError)
        ):
            consume_loop._raise_if_closed(link)
        assert link.channel().is_open  # reopened
    finally:
        link.drop()


def test_dropping_a_connection_that_does_not_answer(paths: str, broker_url: str) -> None:
    link = Link(_config.resolve(BROKER_URL), "test-door")  # type: ignore[arg-type]
    link.channel()
    connection = link.connection
    assert connection is not None
    try:
        link.abort("test: not answering")
        assert link.connection is None
        # The fast path ends the stream; pika's paths can only forget it.
        assert connection.is_open is (paths == "pika")
        assert link.channel().is_open
    finally:
        link.drop()
        if connection.is_open:
            connection.close()


def test_connection_info_over_plain_amqp(paths: str, broker_url: str) -> None:
    info = connection_info(_config.resolve(BROKER_URL))  # type: ignore[arg-type]
    assert info.tls is None
    assert info.describe().endswith("plain AMQP (no TLS)")
