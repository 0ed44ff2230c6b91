"""A small TCP proxy between a client and the broker, for cutting the wire.

It stands in for the network: :meth:`TcpProxy.cut` kills every open socket
(a lost connection), :meth:`TcpProxy.freeze` makes the open connections a
black hole (missed heartbeats), and :meth:`TcpProxy.refuse` makes it look
like a node that went down (new connections are closed at once).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from types import TracebackType

_CHUNK = 65536


class _Pair:
    """One proxied connection: the client's socket and ours to the broker."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.frozen = False
        self.closed = threading.Event()

    def pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                data = source.recv(_CHUNK)
                if self.frozen:
                    if not data:
                        # Keep the client's socket open: a black hole sends
                        # no FIN. Only the client's own heartbeat check may end it.
                        self.closed.wait()
                        return
                    continue  # swallowed
                if not data:
                    break
                destination.sendall(data)
        except OSError:
            pass  # the other side is gone, or cut() closed the socket
        if not self.frozen:
            self.close()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._refusing = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        parts = urllib.parse.urlsplit(url)
        return cls(parts.hostname or "localhost", parts.port or 5672)

    def url(self, broker_url: str, **query: str) -> str:
        """``broker_url`` rewritten to go through this proxy, with extra query options."""
        parts = urllib.parse.urlsplit(broker_url)
        netloc = parts.netloc.rpartition("@")
        userinfo = netloc[0] + netloc[1]
        options = dict(urllib.parse.parse_qsl(parts.query))
        options.update(query)
        return urllib.parse.urlunsplit(
            parts._replace(
                netloc=f"{userinfo}127.0.0.1:{self.port}",
                query=urllib.parse.urlencode(options),
            )
        )

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            # A network forwards each segment as it comes: no Nagle delay
            # here, or pika's three writes per message would wait ~40 ms for
            # the broker's delayed ACK at every message.
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            for source, destination in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=pair.pump,
                    args=(source, destination),
                    name="tcp-proxy-pump",
                    daemon=True,
                ).start()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for pair in self._pairs if not pair.closed.is_set())

    def cut(self) -> int:
        """Close every open connection (both sides); return how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.frozen = False
            pair.close()
        return sum(1 for _ in pairs)

    def freeze(self) -> None:
        """Stop forwarding on the open connections, without closing them."""
        with self._lock:
            for pair in self._pairs:
                pair.frozen = True

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections at once (a node that is down), or accept again."""
        self._refusing = refusing

    def close(self) -> None:
        self._listener.close()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
