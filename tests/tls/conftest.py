"""Fixtures for the TLS tests: certificates, and one RabbitMQ node with a TLS
listener for the whole session (see node.py), beside the shared test broker.

Skipped only when RabbitMQ is not installed, and then not in CI (CI=true):
there a missing or failing node fails the run.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

from .certs import Certificates, Pair, make_certificates
from .node import AMQP_PORT, TLS_PORT, TLSNode, rabbitmq_available, start_node


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A fresh CA, server, client, expired and foreign certificates."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def tls_node(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSNode]:
    """The TLS node, started once, stopped at the end of the session."""
    if not rabbitmq_available():
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server is not installed: the TLS tests need it")
        pytest.skip("rabbitmq-server is not installed")
    node = start_node(certs, tmp_path_factory.mktemp("tls-node"))
    yield node
    node.stop()


def url(
    *,
    port: int = TLS_PORT,
    host: str = "localhost",
    user: str | None = "guest:guest",
    scheme: str = "amqps",
    **options: str | Path,
) -> str:
    """An AMQP URL for the TLS node with the given query options."""
    query = urllib.parse.urlencode({name: str(value) for name, value in options.items()})
    userinfo = f"{user}@" if user else ""
    return f"{scheme}://{userinfo}{host}:{port}/%2F" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class TLS:
    """URLs of the running TLS node."""

    node: TLSNode
    certs: Certificates

    @property
    def url(self) -> str:
        """Password login, server verified against the test CA."""
        return url(cacertfile=self.certs.ca)

    def external_url(self, client: Pair | None = None) -> str:
        """Client-certificate login (EXTERNAL)."""
        pair = client or self.certs.client
        return url(
            user=None,
            cacertfile=self.certs.ca,
            certfile=pair.cert,
            keyfile=pair.key,
            auth_mechanism="external",
        )

    @property
    def plain_url(self) -> str:
        """The node's plain AMQP port (for setting up and checking)."""
        return url(scheme="amqp", port=AMQP_PORT)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certs.ca))

    def channel_call(self, function: str, *args: object) -> object:
        """Call a channel method over a raw pika connection to the node."""
        connection = pika.BlockingConnection(pika.URLParameters(self.plain_url))
        try:
            return getattr(connection.channel(), function)(*args)
        finally:
            connection.close()


@pytest.fixture
def tls(tls_node: TLSNode, certs: Certificates) -> TLS:
    return TLS(tls_node, certs)


class TLSNames:
    """Unique handler names on the TLS node; their queues are deleted after the test."""

    def __init__(self, tls: TLS) -> None:
        self._tls = tls
        self._names: list[str] = []

    def new(self, prefix: str = "tls") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self._names.append(name)
        return name

    def cleanup(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self._tls.plain_url))
        try:
            channel = connection.channel()
            for name in self._names:
                for queue in (name, f"{name}-dl"):
                    channel.queue_delete(queue)
                for exchange in (f"{name}-retry", f"{name}-dlx"):
                    channel.exchange_delete(exchange)
        finally:
            connection.close()


@pytest.fixture
def tls_names(tls: TLS) -> Iterator[TLSNames]:
    registry = TLSNames(tls)
    yield registry
    registry.cleanup()


@pytest.fixture(autouse=True)
def _no_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests name their broker themselves."""
    monkeypatch.delenv("DOMAIN_EVENT_BROKER", raising=False)
    monkeypatch.delenv("DOMAIN_EVENT_BROKER_FILE", raising=False)
