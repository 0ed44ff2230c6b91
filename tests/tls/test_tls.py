"""Connecting over TLS to a real RabbitMQ node with a TLS listener.

Publishing, subscribing, replay and the command line over TLS, client
certificate login (EXTERNAL), each TLS failure with its message, a cluster
list mixing a dead node and the TLS node, ``DOMAIN_EVENT_BROKER_FILE``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from domain_event_broker import (
    BrokerUnavailableError,
    ConfigurationError,
    DomainEvent,
    Publisher,
    Subscriber,
    TLSError,
    configure,
    publish_domain_event,
    replay_all,
)
from domain_event_broker._amqp import config as _config
from domain_event_broker._amqp import pika_internals
from domain_event_broker._amqp import session as _session
from domain_event_broker._amqp.session import connection_info

from ..helpers import wait_for
from .certs import CLIENT_CN, KEY_PASSPHRASE, Certificates
from .conftest import TLS, TLSNames, url
from .node import AMQP_PORT, TLS_PORT

pytestmark = pytest.mark.timeout(60)

#: A TLS failure must be reported this fast (the deadline is 30 s).
QUICKLY = 5.0


class Recorder:
    def __init__(self) -> None:
        self.events: list[DomainEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: DomainEvent) -> None:
        with self.lock:
            self.events.append(event)

    def uuids(self) -> list[str]:
        with self.lock:
            return [event.uuid_string for event in self.events]


def consume_until(subscriber: Subscriber, predicate: Any, timeout: float = 20.0) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            subscriber.start_consuming(timeout=timeout)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(predicate, timeout=timeout)
    finally:
        subscriber.stop_consuming()
        thread.join(timeout=30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def queue_size(tls: TLS, name: str) -> int:
    frame: Any = tls.channel_call("queue_declare", name, True)
    return int(frame.method.message_count)


# -- publishing, subscribing, replay ---------------------------------------------------------


def test_publish_and_subscribe_over_tls(tls: TLS, tls_names: TLSNames) -> None:
    name = tls_names.new()
    recorder = Recorder()
    subscriber = Subscriber(tls.url, timeout=10)
    subscriber.register(recorder, name, ["tls.published"])
    configure(broker=tls.url)
    event = publish_domain_event("tls.published", {"over": "tls"})
    consume_until(subscriber, lambda: event.uuid_string in recorder.uuids())
    assert recorder.events[0].data == {"over": "tls"}


def test_replay_over_tls(tls: TLS, tls_names: TLSNames) -> None:
    name = tls_names.new()

    def fail(event: DomainEvent) -> None:
        raise RuntimeError("dead-letter me")

    subscriber = Subscriber(tls.url, timeout=10)
    subscriber.register(fail, name, ["tls.replayed"], dead_letter=True)
    with Publisher(tls.url) as publisher:
        publisher.publish_event(DomainEvent("tls.replayed", {"n": 1}))
    consume_until(subscriber, lambda: queue_size(tls, f"{name}-dl") == 1)

    assert replay_all(name, connection_settings=tls.url) == 0  # none left
    assert queue_size(tls, f"{name}-dl") == 0
    wait_for(lambda: queue_size(tls, name) == 1, message="the replayed event in the inbox")


def test_client_certificate_login(tls: TLS, tls_names: TLSNames) -> None:
    with Publisher(tls.external_url()) as publisher:
        publisher.connect()
        publisher.publish_event(DomainEvent("tls.external", {}))
        connections = tls.node.ctl(
            "list_connections", "user", "auth_mechanism", "ssl", "--no-table-headers"
        )
    rows = [line.split("\t") for line in connections.splitlines() if line.strip()]
    assert [CLIENT_CN, "EXTERNAL", "true"] in rows, connections


def test_a_cluster_list_skips_a_dead_node(tls: TLS) -> None:
    dead = _unused_port()
    urls = [url(port=dead, cacertfile=tls.certs.ca), tls.url]
    with Publisher(urls, timeout=10) as publisher:
        publisher.publish_event(DomainEvent("tls.cluster", {}))
    configure(broker=" ".join(urls))
    publish_domain_event("tls.cluster", {})


def test_ssl_context_from_python(tls: TLS) -> None:
    with Publisher(url(), ssl_context=tls.context()) as publisher:
        publisher.publish_event(DomainEvent("tls.context", {}))
    configure(ssl_context=tls.context())
    publish_domain_event("tls.context", {}, connection_settings=url())
    # The scheme decides: an amqp:// URL stays plain with a context configured.
    publish_domain_event("tls.context", {}, connection_settings=tls.plain_url)


def test_ssl_context_with_a_client_certificate(tls: TLS) -> None:
    context = tls.context()
    context.load_cert_chain(
        tls.certs.client.cert, tls.certs.client_encrypted_key, password=KEY_PASSPHRASE
    )
    external = url(user=None, auth_mechanism="external")
    with Publisher(external, ssl_context=context) as publisher:
        publisher.publish_event(DomainEvent("tls.context", {}))


def test_verify_none_warns_and_connects(tls: TLS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="domain_event_broker")
    unverified = url(verify="verify_none", cacertfile=tls.certs.other_ca)
    with Publisher(unverified) as publisher:
        publisher.publish_event(DomainEvent("tls.unverified", {}))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("verification is off" in message for message in warnings), warnings
    assert all("guest:guest" not in message for message in warnings)


def test_verify_none_in_an_ssl_context_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="domain_event_broker")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    configure(ssl_context=context)
    assert any("verification is off" in r.getMessage() for r in caplog.records)


# -- failures: one clear TLSError, quickly, never plain text -----------------------------


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def expired_server(certs: Certificates) -> Iterator[int]:
    """A TLS server presenting an expired certificate signed by the test CA.

    RabbitMQ has one certificate per node, so this failure is shown by a
    plain TLS server: the client gives up during the handshake, before AMQP.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.expired_server.cert, certs.expired_server.key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            with client:
                try:
                    with context.wrap_socket(client, server_side=True) as tls_client:
                        tls_client.recv(8)
                except (OSError, ssl.SSLError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _failure(connection_settings: str | list[str], **kwargs: Any) -> TLSError:
    started = time.monotonic()
    with pytest.raises(TLSError) as caught, Publisher(connection_settings, **kwargs) as publisher:
        publisher.publish_event(DomainEvent("tls.failure", {}))
    assert time.monotonic() - started < QUICKLY
    assert isinstance(caught.value.__cause__, Exception)  # pika's error, chained
    assert "guest:guest" not in str(caught.value)
    return caught.value


def test_unknown_ca(tls: TLS) -> None:
    error = _failure(url(cacertfile=tls.certs.other_ca))
    assert f"the certificate of localhost:{TLS_PORT} is not signed by a trusted" in str(error)
    assert "set cacertfile= to the CA that signed it" in str(error)


def test_verification_is_on_by_default(tls: TLS) -> None:
    # No cacertfile: the system's trust store, which does not know the test CA.
    error = _failure(url())
    assert "is not signed by a trusted certificate authority" in str(error)


def test_hostname_mismatch(tls: TLS) -> None:
    error = _failure(url(cacertfile=tls.certs.ca, server_name_indication="wrong.example"))
    assert "is not valid for the host name 'wrong.example'" in str(error)


def test_server_name_indication_checks_the_name_given(tls: TLS) -> None:
    # 127.0.0.1 is in the certificate, but the name checked is the one given.
    with Publisher(
        url(host="127.0.0.1", cacertfile=tls.certs.ca, server_name_indication="localhost")
    ) as p:
        p.publish_event(DomainEvent("tls.sni", {}))


def test_expired_server_certificate(certs: Certificates, expired_server: int) -> None:
    error = _failure(url(port=expired_server, cacertfile=certs.ca))
    assert str(error).endswith(f"the certificate of localhost:{expired_server} has expired")


def test_plain_amqp_port_behind_amqps(tls: TLS) -> None:
    # The plain port would accept guest/guest in plain text: it must not be used.
    error = _failure(url(port=AMQP_PORT, cacertfile=tls.certs.ca))
    assert f"localhost:{AMQP_PORT} did not answer with TLS: it looks like a plain AMQP port" in str(
        error
    )


def test_expired_client_certificate(tls: TLS) -> None:
    error = _failure(tls.external_url(tls.certs.expired_client))
    assert str(error).endswith(
        f"the broker at localhost:{TLS_PORT} refused the client certificate: it has expired"
    )


def test_client_certificate_from_an_unknown_ca(tls: TLS) -> None:
    error = _failure(tls.external_url(tls.certs.other_ca_client))
    assert "refused the client certificate: it is not signed by a certificate authority" in str(
        error
    )


def test_a_silent_tls_port_does_not_hang(certs: Certificates) -> None:
    # Accepts TCP and never answers the TLS handshake: the deadline still holds.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        started = time.monotonic()
        with (
            pytest.raises(BrokerUnavailableError, match="could not connect") as caught,
            Publisher(url(port=silent.getsockname()[1], cacertfile=certs.ca), timeout=2) as p,
        ):
            p.connect()
        assert time.monotonic() - started < 10
        assert not isinstance(caught.value, TLSError)


def test_a_dead_node_and_a_misconfigured_tls_node(tls: TLS) -> None:
    error = _failure(
        [url(port=_unused_port(), cacertfile=tls.certs.ca), url(cacertfile=tls.certs.other_ca)]
    )
    assert "is not signed by a trusted certificate authority" in str(error)


def test_subscriber_register_fails_the_same_way(tls: TLS, tls_names: TLSNames) -> None:
    with (
        Subscriber(url(cacertfile=tls.certs.other_ca)) as subscriber,
        pytest.raises(TLSError, match="not signed by a trusted"),
    ):
        subscriber.register(lambda event: None, tls_names.new(), ["tls.x"])


# -- secrets outside the URL -------------------------------------------------------------


def test_broker_file(tls: TLS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "broker-url"
    secret.write_text(f"# mounted secret\n{tls.url}\n")
    monkeypatch.setenv("DOMAIN_EVENT_BROKER_FILE", str(secret))
    event = publish_domain_event("tls.file", {})
    assert event.routing_key == "tls.file"
    # Rotated: the new content is used (here: a node that is not there).
    secret.write_text(url(port=_unused_port(), cacertfile=tls.certs.ca) + "\n# rotated\n")
    with pytest.raises(Exception, match="could not connect"):
        Publisher(timeout=1).connect()


# -- the command line --------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "domain_event_broker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_command_line_over_tls(tls: TLS, tls_names: TLSNames, tmp_path: Path) -> None:
    name = tls_names.new()
    with Subscriber(tls.url) as subscriber:
        subscriber.register(lambda event: None, name, ["tls.cli"], dead_letter=True)
    secret = tmp_path / "broker-url"
    secret.write_text(tls.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOMAIN_EVENT_BROKER")}
    env["DOMAIN_EVENT_BROKER_FILE"] = str(secret)

    published = _cli("publish", "tls.cli", '{"via": "cli"}', env=env)
    assert published.returncode == 0, published.stderr
    wait_for(lambda: queue_size(tls, name) == 1)

    status = _cli("status", name, env=env)
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith("connection"))
    assert f"localhost:{TLS_PORT} TLSv1." in line
    assert "server certificate expires" in line

    as_json = json.loads(_cli("status", name, "--json", env=env).stdout)["connection"]
    assert as_json["tls"] is True
    assert as_json["version"].startswith("TLSv1.")
    assert as_json["certificate_expires"]

    inspect = _cli("inspect", name, env=env)
    assert inspect.returncode == 0, inspect.stderr

    bad = _cli("--url", url(cacertfile=tls.certs.other_ca), "status", name, env=env)
    assert bad.returncode == 1
    assert "not signed by a trusted certificate authority" in bad.stderr
    assert "guest:guest" not in bad.stderr


def test_status_says_when_the_connection_is_plain(tls: TLS, tls_names: TLSNames) -> None:
    name = tls_names.new()
    with Subscriber(tls.plain_url) as subscriber:
        subscriber.register(lambda event: None, name, ["tls.cli"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOMAIN_EVENT_BROKER")}
    status = _cli("--url", tls.plain_url, "status", name, env=env)
    assert f"localhost:{AMQP_PORT} plain AMQP (no TLS)" in status.stdout, status.stderr


@pytest.mark.parametrize("fast_paths", [True, False])
def test_connection_info_with_and_without_pikas_fast_paths(
    tls: TLS, fast_paths: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the fast paths pika does not show its TLS socket: the status
    says TLS, but not which version, cipher or expiry."""
    if fast_paths and not pika_internals.FAST_PATHS_ACTIVE:
        pytest.skip(f"pika's fast paths are off: {pika_internals.FAST_PATHS_REASON}")
    monkeypatch.setattr(pika_internals, "FAST_PATHS_ACTIVE", fast_paths)
    info = connection_info(_config.resolve(tls.url))  # type: ignore[arg-type]
    assert (info.host, info.port) == ("localhost", TLS_PORT)
    if fast_paths:
        assert info.tls is not None
        assert info.tls.version.startswith("TLSv1.")
        assert info.tls.not_after is not None
    else:
        assert info.tls is _session.UNKNOWN_SESSION
        assert info.describe() == (
            f"localhost:{TLS_PORT} TLS (session details unavailable), "
            f"server certificate expiry unknown"
        )
        assert info.as_dict()["tls"] is True
    plain = connection_info(_config.resolve(tls.plain_url))  # type: ignore[arg-type]
    assert plain.describe() == f"localhost:{AMQP_PORT} plain AMQP (no TLS)"


def test_configuration_errors_come_before_connecting(tls: TLS) -> None:
    with pytest.raises(ConfigurationError, match="needs a client certificate"):
        Publisher(url(user=None, cacertfile=tls.certs.ca, auth_mechanism="external"))
    with pytest.raises(ConfigurationError, match="is encrypted"):
        Publisher(
            url(
                cacertfile=tls.certs.ca,
                certfile=tls.certs.client.cert,
                keyfile=tls.certs.client_encrypted_key,
            )
        )


def test_pika_is_not_given_a_plain_connection_for_amqps(tls: TLS) -> None:
    params = Publisher(tls.url)._config.parameters("x", 5)[0]  # type: ignore[union-attr]
    assert isinstance(params.ssl_options, pika.SSLOptions)
    assert params.ssl_options.server_hostname == "localhost"
    assert params.port == TLS_PORT
