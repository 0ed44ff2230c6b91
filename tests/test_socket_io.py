"""The socket I/O every connection uses (``pika_internals.lean_io``).

Writing: a message's frames are joined and handed to the socket as it is
published when nothing is queued before it; what the socket does not take
is queued. Reading: one ``recv()`` per wakeup unless a full chunk came. The
tests drive pika's own plain TCP transport on a real socket pair with small
buffers, so that partial sends, full buffers and partial reads happen at
will, and check the property that matters: every byte arrives, in order.
(The same paths against the broker: ``tests/test_publish.py``.)
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from domain_event_broker._amqp.pika_internals import lean_io

from .helpers import count_socket_io

pytestmark = pytest.mark.fast_paths


class Loop:
    """Stands in for pika's I/O loop: remembers what the transport asks to watch."""

    def __init__(self) -> None:
        self.on_writable: Callable[[], None] | None = None
        self.callbacks: list[Callable[[], None]] = []

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def set_reader(self, fd: int, on_readable: Callable[[], None]) -> None:
        pass

    def remove_reader(self, fd: int) -> bool:
        return True

    def set_writer(self, fd: int, on_writable: Callable[[], None]) -> None:
        self.on_writable = on_writable

    def remove_writer(self, fd: int) -> bool:
        self.on_writable = None
        return True


class Protocol:
    """Stands in for pika's connection: what the transport hands it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended = False
        self.lost: BaseException | None = None

    def connection_made(self, transport: object) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        self.ended = True
        return True  # keep it open: nothing to tear down here

    def connection_lost(self, error: BaseException | None) -> None:
        self.lost = error


class Wire:
    """A plain pika transport on one end of a socket pair, read at the other."""

    def __init__(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.loop = Loop()
        self.protocol = Protocol()
        self.transport = _AsyncPlaintextTransport(self.ours, self.protocol, self.loop)
        self.socket = count_socket_io(self.transport)
        self.impl = SimpleNamespace(
            _transport=self.transport,
            _adapter_emit_data=self.transport.write,
            _output_marshaled_frames=None,
            bytes_sent=0,
            frames_sent=0,
        )
        lean_io(SimpleNamespace(_impl=self.impl))  # type: ignore[arg-type]
        self.received = bytearray()

    def output(self, frames: list[bytes]) -> None:
        """What pika calls with a message's frames."""
        self.impl._output_marshaled_frames(frames)

    def read(self, at_most: int) -> None:
        """The peer reads up to ``at_most`` bytes (whatever has arrived)."""
        with contextlib.suppress(BlockingIOError):  # nothing has arrived
            self.received += self.peer.recv(at_most)

    def turn(self) -> None:
        """One turn of the loop: send queued bytes if it watches for
        writability, then run the callbacks scheduled."""
        if self.loop.on_writable is not None:
            self.loop.on_writable()
        callbacks, self.loop.callbacks = self.loop.callbacks, []
        for callback in callbacks:
            callback()

    def drain(self) -> None:
        while self.transport.get_write_buffer_size():
            self.read(1 << 20)
            self.turn()
        self.read(1 << 20)
        while True:
            before = len(self.received)
            self.read(1 << 20)
            if len(self.received) == before:
                return

    def wake_while_readable(self) -> None:
        """What pika's loop does: call the transport while the socket is readable."""
        while select.select([self.ours], [], [], 0)[0] and not self.protocol.ended:
            self.transport._on_socket_readable()

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def wire() -> Iterator[Wire]:
    made = Wire()
    yield made
    made.close()


def test_a_message_the_socket_takes_whole_needs_no_loop_turn(wire: Wire) -> None:
    wire.output([b"method", b"header", b"body"])
    assert wire.loop.on_writable is None  # nothing was queued
    wire.drain()
    assert bytes(wire.received) == b"methodheaderbody"
    assert (wire.impl.bytes_sent, wire.impl.frames_sent) == (16, 3)


def test_what_a_full_socket_does_not_take_is_queued(wire: Wire) -> None:
    message = bytes(range(256)) * 4096  # 1 MiB: far more than the buffers hold
    wire.output([message])
    assert 0 < wire.transport.get_write_buffer_size() < len(message)
    assert wire.loop.on_writable is not None
    wire.drain()
    assert bytes(wire.received) == message


def test_a_broken_socket_is_left_to_pikas_write_which_reports_the_loss(wire: Wire) -> None:
    wire.peer.close()
    for _ in range(5):  # the kernel may take the first send before it learns
        wire.output([b"x" * 1000])  # never raises: the error is pika's to report
        wire.turn()
    assert isinstance(wire.protocol.lost, OSError)


def test_a_reset_while_reading_is_reported_as_the_loss(wire: Wire) -> None:
    wire.output([b"unread by the peer"])
    wire.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wire.peer.close()  # with unread data and no linger: a reset
    select.select([wire.ours], [], [], 5)
    wire.transport._on_socket_readable()
    wire.turn()
    assert isinstance(wire.protocol.lost, ConnectionResetError)


# A step: publish a message (its frames, as lengths), or let the peer read
# some bytes, or give the loop a turn to send what is queued.
Step = tuple[str, Any]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.lists(st.integers(1, 20_000), min_size=1, max_size=3)),
        st.tuples(st.just("read"), st.integers(1, 30_000)),
        st.tuples(st.just("turn"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps)
def test_the_peer_receives_every_byte_in_order(steps: list[Step]) -> None:
    wire = Wire()
    try:
        expected = bytearray()
        for number, (action, argument) in enumerate(steps):
            if action == "publish":
                frames = [bytes([number % 256]) * size for size in argument]
                expected += b"".join(frames)
                wire.output(frames)
            elif action == "read":
                wire.read(argument)
            else:
                wire.turn()
        wire.drain()
        assert bytes(wire.received) == bytes(expected)
        assert wire.impl.bytes_sent == len(expected)
    finally:
        wire.close()


def test_a_wakeup_reads_once_when_less_than_a_chunk_waits(wire: Wire) -> None:
    wire.peer.sendall(b"x" * 100)
    wire.transport._on_socket_readable()
    assert bytes(wire.protocol.received) == b"x" * 100
    assert (wire.socket.reads, wire.socket.would_block) == (1, 0)


def test_a_full_chunk_is_followed_by_another_read(wire: Wire) -> None:
    chunk = wire.transport._MAX_RECV_BYTES
    wire.peer.sendall(b"y" * (chunk + 10))
    wire.wake_while_readable()
    assert bytes(wire.protocol.received) == b"y" * (chunk + 10)


def test_the_end_of_the_stream_is_reported(wire: Wire) -> None:
    wire.peer.sendall(b"last words")
    wire.peer.shutdown(socket.SHUT_WR)
    wire.wake_while_readable()
    assert bytes(wire.protocol.received) == b"last words"
    assert wire.protocol.ended


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(st.integers(1, 20_000), st.booleans()),  # (size, wake up after it)
        max_size=30,
    )
)
def test_every_byte_the_peer_sends_is_read_in_order(pieces: list[tuple[int, bool]]) -> None:
    wire = Wire()
    try:
        expected = bytearray()
        for number, (size, wake) in enumerate(pieces):
            piece = bytes([number % 256]) * size
            expected += piece
            view = memoryview(piece)
            while view:  # the socket buffers are small: read while sending
                with contextlib.suppress(BlockingIOError):
                    view = view[wire.peer.send(view) :]
                wire.wake_while_readable()
            if wake:
                wire.wake_while_readable()
        wire.wake_while_readable()
        assert bytes(wire.protocol.received) == bytes(expected)
    finally:
        wire.close()
