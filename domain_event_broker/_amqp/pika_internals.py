"""The one door to pika's internals: the only module of the package that
touches pika's private names (anything of pika's that starts with ``_``).

Everything else reaches them through the functions here, whose names say
what they do, not how pika does it:

* :func:`lean_io`: fewer system calls per message (written and read);
* :func:`deliver_as_read`: a consumer called as each delivery is read;
* :func:`pipeline`: publishes on a confirm channel that do not wait for
  their confirm (batches);
* :func:`closing_reason`: why pika closed a channel;
* :func:`frame_max`: the largest frame a connection may send (negotiated);
* :func:`abort_connection`: drop a connection without the closing handshake;
* :func:`ssl_socket`: the TLS socket under a connection;
* :func:`lenient_decoding`: a delivery whose headers pika's decoder
  rejects arrives with those headers described instead (not a fast path:
  see below).

Each has a *fast path*, which uses pika's private names, and a fallback
that uses pika's public API only, or does without (each function says
what is lost). The fast paths are on when, at import:

* the environment variable ``DOMAIN_EVENT_BROKER_PIKA_FAST_PATHS`` is not
  ``0`` (see docs/configuration.rst), and
* :func:`mismatches` finds every name they use and every call shape they
  rely on (:data:`CHECKS`) in the installed pika.

Otherwise one WARNING names the pika version and what is missing, and
every function takes its fallback: pika's own code paths throughout, never
a half-patched connection. :data:`FAST_PATHS_ACTIVE` says which, and
:data:`FAST_PATHS_REASON` why not.

:func:`lenient_decoding` is a repair, not a speed-up: without it, one
message with a header pika cannot decode (a timestamp past the year 9999,
a table nested deeper than Python's recursion limit) kills the connection
each time it is delivered, and the worker stalls on it for ever. It stays
on when the fast paths are turned off; it relies on :data:`REPAIR_CHECKS`
only, and when the installed pika lacks one of those, one WARNING says so
and connections are left as pika made them. :data:`LENIENT_DECODING_ACTIVE`
says which.

``tests/test_pika_internals.py`` runs the package's paths with the fast
paths off; ``tests/test_socket_io.py`` and ``tests/test_consume_path.py``
drive pika's own classes through the fast paths.
"""

from __future__ import annotations

import dis
import functools
import importlib
import inspect
import logging
import os
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

import pika
import pika.data
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils import io_services_utils

from .._core import headers as _headers

__all__ = [
    "CHECKS",
    "ENVIRONMENT_VARIABLE",
    "FAST_PATHS_ACTIVE",
    "FAST_PATHS_REASON",
    "LENIENT_DECODING_ACTIVE",
    "REPAIR_CHECKS",
    "Pipeline",
    "UndecodableProperties",
    "abort_connection",
    "closing_reason",
    "decide_fast_paths",
    "decide_repairs",
    "deliver_as_read",
    "frame_max",
    "lean_io",
    "lenient_decoding",
    "mismatches",
    "pipeline",
    "ssl_socket",
]

log = logging.getLogger(__name__)

#: ``0`` (or ``false``, ``no``, ``off``) turns every fast path off; read at import.
ENVIRONMENT_VARIABLE: Final = "DOMAIN_EVENT_BROKER_PIKA_FAST_PATHS"

# -- what the fast paths rely on -------------------------------------------------------

_BLOCKING: Final = "pika.adapters.blocking_connection"
_IO: Final = "pika.adapters.utils.io_services_utils"
_BASE: Final = "pika.adapters.base_connection"


class Check(NamedTuple):
    """One thing of pika's that a fast path relies on.

    ``kind`` is one of:

    * ``"signature"``: ``target`` is a function, defined by that class itself,
      whose parameters must read ``shape`` (names, ``*`` for variadic, ``=``
      for a default; annotations and default values ignored): it is replaced
      or called privately;
    * ``"attribute"``: ``target`` must exist (a class constant, a class);
    * ``"int"``: ``target`` must be an ``int`` (a state constant compared
      with in a loop: missing, the loop would spin or never run);
    * ``"stored"``: the ``__init__`` of class ``target`` (or of a base) must
      assign ``self.<shape>`` (an instance attribute read later);
    * ``"calls"``: function ``target`` must name ``shape`` (it calls the
      method that is replaced per connection, so the replacement is used).
    """

    kind: str
    target: str
    shape: str = ""
    #: which fast path needs it
    used_by: str = ""

    def describe(self) -> str:
        if self.kind == "signature":
            return f"{self.target}({self.shape})"
        if self.kind == "stored":
            return f"{self.target}.{self.shape} (set in __init__)"
        if self.kind == "calls":
            return f"{self.target} calling {self.shape}"
        return self.target


#: Everything the fast paths use of pika's, checked at import by :func:`mismatches`.
CHECKS: Final[tuple[Check, ...]] = (
    # lean_io: writing
    Check("stored", f"{_BLOCKING}.BlockingConnection", "_impl", "lean_io"),
    Check(
        "signature",
        "pika.connection.Connection._output_marshaled_frames",
        "self, marshaled_frames",
        "lean_io",
    ),
    Check("signature", f"{_BASE}.BaseConnection._adapter_emit_data", "self, data", "lean_io"),
    Check("stored", "pika.connection.Connection", "bytes_sent", "lean_io"),
    Check("stored", "pika.connection.Connection", "frames_sent", "lean_io"),
    Check("stored", f"{_BASE}.BaseConnection", "_transport", "lean_io"),
    Check("attribute", f"{_IO}._AsyncPlaintextTransport", "", "lean_io"),
    Check("int", f"{_IO}._AsyncPlaintextTransport._STATE_ACTIVE", "", "lean_io"),
    Check("stored", f"{_IO}._AsyncPlaintextTransport", "_state", "lean_io"),
    Check("stored", f"{_IO}._AsyncPlaintextTransport", "_sock", "lean_io"),
    Check("stored", f"{_IO}._AsyncPlaintextTransport", "_tx_buffered_byte_count", "lean_io"),
    # lean_io: reading
    Check("signature", f"{_IO}._AsyncTransportBase._consume", "self", "lean_io"),
    Check("int", f"{_IO}._AsyncPlaintextTransport._MAX_RECV_BYTES", "", "lean_io"),
    Check("int", f"{_IO}._AsyncPlaintextTransport._MAX_CONSUME_BYTES", "", "lean_io"),
    Check("attribute", f"{_IO}._AsyncPlaintextTransport.RxEndOfFile", "", "lean_io"),
    Check("stored", f"{_IO}._AsyncPlaintextTransport", "_protocol", "lean_io"),
    Check("stored", f"{_BASE}._StreamingProtocolShim", "data_received", "lean_io"),
    Check("signature", f"{_BASE}.BaseConnection._proto_data_received", "self, data", "lean_io"),
    # deliver_as_read
    Check("stored", f"{_BLOCKING}.BlockingChannel", "_impl", "deliver_as_read"),
    Check("stored", f"{_BLOCKING}.BlockingChannel", "_consumer_infos", "deliver_as_read"),
    Check("stored", f"{_BLOCKING}._ConsumerInfo", "on_message_callback", "deliver_as_read"),
    Check("stored", "pika.channel.Channel", "_consumers", "deliver_as_read"),
    Check(
        "signature",
        "pika.channel.Channel._on_deliver",
        "self, method_frame, header_frame, body",
        "deliver_as_read",
    ),
    Check(
        "signature",
        f"{_BLOCKING}.BlockingConnection._request_channel_dispatch",
        "self, channel_number",
        "deliver_as_read",
    ),
    # pipeline
    Check(
        "signature",
        "pika.channel.Channel.basic_publish",
        "self, exchange, routing_key, body, properties=, mandatory=",
        "pipeline",
    ),
    Check(
        "signature",
        "pika.channel.Channel.confirm_delivery",
        "self, ack_nack_callback, callback=",
        "pipeline",
    ),
    Check("signature", "pika.channel.Channel.add_on_return_callback", "self, callback", "pipeline"),
    Check("signature", f"{_BLOCKING}.BlockingChannel._flush_output", "self, *waiters", "pipeline"),
    # closing_reason
    Check("stored", f"{_BLOCKING}.BlockingChannel", "_closing_reason", "closing_reason"),
    # abort_connection
    Check(
        "signature",
        "pika.connection.Connection._terminate_stream",
        "self, error",
        "abort_connection",
    ),
    # ssl_socket: the transport's socket (_sock above), for TLS
    Check("attribute", f"{_IO}._AsyncSSLTransport", "", "ssl_socket"),
    Check("stored", f"{_IO}._AsyncSSLTransport", "_sock", "ssl_socket"),
)

#: What :func:`lenient_decoding` relies on (checked at import by :func:`decide_repairs`,
#: whatever :data:`ENVIRONMENT_VARIABLE` says).
REPAIR_CHECKS: Final[tuple[Check, ...]] = (
    Check("stored", f"{_BLOCKING}.BlockingConnection", "_impl", "lenient_decoding"),
    Check("stored", "pika.connection.Connection", "_frame_buffer", "lenient_decoding"),
    Check("signature", "pika.connection.Connection._read_frame", "self", "lenient_decoding"),
    Check(
        "calls",
        "pika.connection.Connection._on_data_available",
        "_read_frame",
        "lenient_decoding",
    ),
)

_MISSING: Final = object()


def _resolve(dotted: str) -> Any:
    """The object at ``dotted`` (a module, then attributes), or :data:`_MISSING`."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            found = getattr(found, name, _MISSING)
            if found is _MISSING:
                return _MISSING
        return found
    return _MISSING


def _shape(function: Any) -> str | None:
    """``function``'s parameters as :class:`Check` writes them, or ``None``."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    shown = []
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            shown.append(f"*{parameter.name}")
        elif parameter.kind is parameter.VAR_KEYWORD:
            shown.append(f"**{parameter.name}")
        else:
            default = "" if parameter.default is parameter.empty else "="
            shown.append(f"{parameter.name}{default}")
    return ", ".join(shown)


def _stored_in_init(cls: type, name: str) -> bool:
    """Whether ``__init__`` of ``cls`` or of a base, or a method of the class
    that ``__init__`` calls (e.g. pika's ``_init_connection_state``), assigns
    an attribute ``name``."""
    seen: set[Any] = set()
    todo = [getattr(klass.__dict__.get("__init__"), "__code__", None) for klass in cls.__mro__]
    depth = {id(code): 0 for code in todo}
    while todo:
        code = todo.pop()
        if code is None or code in seen:
            continue
        seen.add(code)
        # Only code that names the attribute can assign it: disassemble that alone.
        if name in code.co_names and any(
            instruction.opname == "STORE_ATTR" and instruction.argval == name
            for instruction in dis.get_instructions(code)
        ):
            return True
        if depth.get(id(code), 0) < 2:
            for called in code.co_names:
                method = getattr(getattr(cls, called, None), "__code__", None)
                if method is not None and method not in seen:
                    depth[id(method)] = depth.get(id(code), 0) + 1
                    todo.append(method)
    return False


def _fails(check: Check) -> bool:  # noqa: PLR0911  # one return per kind
    found = _resolve(check.target)
    if found is _MISSING:
        return True
    if check.kind == "signature":
        # Defined by that class itself: not an abstract stub of a base left
        # behind when pika moves the implementation.
        owner_path, name = check.target.rsplit(".", 1)
        owner = _resolve(owner_path)
        if isinstance(owner, type) and name not in vars(owner):
            return True
        return _shape(found) != check.shape
    if check.kind == "int":
        return type(found) is not int
    if check.kind == "stored":
        return not isinstance(found, type) or not _stored_in_init(found, check.shape)
    if check.kind == "calls":
        return check.shape not in getattr(getattr(found, "__code__", None), "co_names", ())
    return False


def mismatches(checks: Sequence[Check] = CHECKS) -> list[str]:
    """What of ``checks`` (the fast paths' by default) the installed pika
    lacks (empty: all there)."""
    return [check.describe() for check in checks if _fails(check)]


def _turned_off() -> bool:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    return value in {"0", "false", "no", "off"}


#: Whether the fast paths are in use (decided at import by :func:`decide_fast_paths`).
FAST_PATHS_ACTIVE: bool = False
#: Why they are not ("" when they are).
FAST_PATHS_REASON: str = ""


def decide_fast_paths() -> bool:
    """Check the installed pika and the environment; set :data:`FAST_PATHS_ACTIVE`.

    Run at import. On a pika that lacks something the fast paths rely on,
    logs one WARNING naming pika's version and what is missing.

    Returns:
        Whether the fast paths are on.
    """
    global FAST_PATHS_ACTIVE, FAST_PATHS_REASON  # the module's one switch
    version = getattr(pika, "__version__", "?")
    if _turned_off():
        reason = f"turned off by {ENVIRONMENT_VARIABLE}=0"
        log.debug("pika %s: fast paths %s; using pika's own code paths", version, reason)
    else:
        missing = mismatches()
        reason = ""
        if missing:
            reason = f"pika {version} lacks {', '.join(missing)}"
            log.warning(
                "pika %s differs from what domain_event_broker's fast paths rely on "
                "(missing or changed: %s); using pika's own code paths (slower, same "
                "results)",
                version,
                ", ".join(missing),
            )
    FAST_PATHS_ACTIVE, FAST_PATHS_REASON = not reason, reason
    return FAST_PATHS_ACTIVE


#: Whether :func:`lenient_decoding` is in use (decided at import by :func:`decide_repairs`).
LENIENT_DECODING_ACTIVE: bool = False


def decide_repairs() -> bool:
    """Check the installed pika for :data:`REPAIR_CHECKS`; set
    :data:`LENIENT_DECODING_ACTIVE`.

    Run at import; the environment variable of the fast paths does not turn
    it off. On a pika that lacks something, logs one WARNING.

    Returns:
        Whether :func:`lenient_decoding` is on.
    """
    global LENIENT_DECODING_ACTIVE  # noqa: PLW0603  # the module's other switch, set at import
    missing = mismatches(REPAIR_CHECKS)
    if missing:
        log.warning(
            "pika %s differs from what domain_event_broker's lenient decoding relies on "
            "(missing or changed: %s); a delivery with a header pika cannot decode will "
            "drop the connection each time it is delivered",
            getattr(pika, "__version__", "?"),
            ", ".join(missing),
        )
    LENIENT_DECODING_ACTIVE = not missing
    return LENIENT_DECODING_ACTIVE


# -- writing and reading ---------------------------------------------------------------


def lean_io(connection: pika.BlockingConnection) -> pika.BlockingConnection:
    """Spare ``connection`` the system calls pika makes for nothing.

    * Each message's method, header and body frames reach the socket in one
      write, as the message is sent (:func:`_send_now`). pika writes them one
      by one, so a small message cost three ``send()`` calls and three TCP
      segments for the broker to read, each after a turn of its loop.
    * Reading stops once the socket is empty (:func:`_read_until_empty`):
      pika read again until the kernel said "would block", a system call
      and a Python exception per wakeup.

    The bytes on the wire are the same. ``_output_marshaled_frames`` is where
    pika 1.x emits a message's frames. Fallback: the connection as pika made it.
    """
    if not FAST_PATHS_ACTIVE:
        return connection
    impl = connection._impl

    def output_marshaled_frames(marshaled_frames: Sequence[bytes]) -> None:
        data = marshaled_frames[0] if len(marshaled_frames) == 1 else b"".join(marshaled_frames)
        impl.bytes_sent += len(data)
        impl.frames_sent += len(marshaled_frames)
        rest = _send_now(impl._transport, data)
        if rest:
            impl._adapter_emit_data(rest)  # queued: sent when the socket can take it

    impl._output_marshaled_frames = output_marshaled_frames
    transport = impl._transport
    if _is_plain(transport):
        transport._consume = functools.partial(_read_until_empty, transport)
    return connection


#: pika's transport for plain TCP, and its state while the connection is up
#: (both checked by :func:`mismatches`; unused when the fast paths are off).
_PLAIN_TRANSPORT: Final = getattr(io_services_utils, "_AsyncPlaintextTransport", None)
_ACTIVE: Final = getattr(_PLAIN_TRANSPORT, "_STATE_ACTIVE", None)


def _is_plain(transport: object) -> bool:
    """Whether ``transport`` is pika's plain TCP one (TLS keeps pika's own I/O)."""
    return _PLAIN_TRANSPORT is not None and type(transport) is _PLAIN_TRANSPORT


def _send_now(transport: Any, data: bytes) -> bytes:
    """Hand ``data`` to the socket now if nothing is queued before it; return
    what the socket did not take.

    pika queues every write, asks its event loop to watch the socket for
    writability, and sends on the loop's next turn: two more system calls
    and a poll per message. A socket with free buffer space (the usual case)
    takes the message at once; what it does not take is returned, to be
    queued behind nothing, so the order of bytes holds. Only a plain TCP
    connection with an empty queue sends at once. A socket error is left to
    pika's own write, which meets it again and closes the connection as it
    always does.
    """
    if not _is_plain(transport) or transport._state != _ACTIVE or transport._tx_buffered_byte_count:
        return data
    try:
        sent: int = transport._sock.send(data)
    except OSError:  # would block, or broken: see the docstring
        return data
    return data[sent:]


def _read_until_empty(transport: Any) -> None:
    """pika's ``_consume`` for a plain TCP transport, without the last read.

    pika reads in chunks until ``recv()`` raises "would block" (or 100 kB
    were read). A chunk shorter than asked for means the socket was empty
    just then, so this stops there: the event loop watches the socket
    (level-triggered) and calls again as soon as more arrives. Everything
    else is pika's: end of stream, errors, the per-wakeup limit.

    Raises:
        RxEndOfFile: the broker closed the connection.
        OSError: from ``recv()``, as pika's own.
    """
    chunk, limit = transport._MAX_RECV_BYTES, transport._MAX_CONSUME_BYTES
    received = 0
    while transport._state == _ACTIVE and received < limit:
        data: bytes = transport._sock.recv(chunk)
        if not data:
            log.debug("The broker closed the connection (end of stream)")
            raise transport.RxEndOfFile()
        received += len(data)
        transport._protocol.data_received(data)
        if len(data) < chunk:
            return


# -- consuming ---------------------------------------------------------------------------


def deliver_as_read(channel: BlockingChannel, consumer_tag: str) -> bool:
    """Have pika call the consumer ``consumer_tag`` of ``channel`` as each
    delivery is read, rather than queue it for a later dispatch.

    pika's ``BlockingChannel`` wraps every delivery in an event object,
    queues it, and calls the consumer from ``process_data_events()`` once the
    read is done: about 2 µs per delivery, a sixth of decoding it. Here the
    consumer is called straight from the frame that completes the message,
    with the same arguments; ``process_data_events()`` is still asked to
    return after the read, as it would to dispatch. The consumer must only
    note the delivery (it runs inside pika's reading, where using the
    channel would nest).

    Cancelling still works as pika documents it, except that no delivery is
    left undispatched for ``basic_cancel()`` to reject: each one has reached
    the consumer already.

    Fallback (and for a consumer pika does not know): the consumer is left as
    pika made it, called from ``process_data_events()`` after the read.

    Returns:
        Whether deliveries now reach the consumer as read.
    """
    if not FAST_PATHS_ACTIVE:
        return False
    impl_consumers = channel._impl._consumers
    info = channel._consumer_infos.get(consumer_tag)
    if consumer_tag not in impl_consumers or info is None or info.on_message_callback is None:
        return False
    callback = info.on_message_callback
    request_dispatch = channel.connection._request_channel_dispatch
    wake_number = -channel.channel_number  # negative: "return", nothing to dispatch

    def deliver(
        _impl: object,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        callback(channel, method, properties, body)
        request_dispatch(wake_number)

    impl_consumers[consumer_tag] = deliver
    return True


# -- publishing batches ------------------------------------------------------------------


class Pipeline:
    """A confirm-mode channel whose publishes do not wait for their confirm.

    Made by :func:`pipeline`; confirms and returns reach the callbacks given
    there, while :meth:`run_until` runs pika's I/O.
    """

    __slots__ = ("_channel", "send_without_waiting")

    def __init__(self, channel: BlockingChannel) -> None:
        self._channel = channel
        #: ``send_without_waiting(exchange, routing_key, body, properties,
        #: mandatory)``: publish into the client's buffer; the confirm comes
        #: later. (pika's own method, whose parameters the check at import
        #: saw: no call in between, it runs once per event of a batch.)
        self.send_without_waiting: Callable[[str, str, bytes, pika.BasicProperties, bool], None] = (
            channel._impl.basic_publish
        )

    def run_until(self, done: Callable[[], bool] | None = None) -> None:
        """Send what is buffered and process I/O (confirms come in) until
        ``done()`` is true, or just until the buffer is sent (``None``).

        Raises:
            pika's errors: the channel or connection was closed meanwhile.
        """
        if done is None:
            self._channel._flush_output()
        else:
            self._channel._flush_output(done)


def pipeline(
    channel: BlockingChannel,
    on_confirm: Callable[[int, bool, bool], None],
    on_return: Callable[[str, pika.BasicProperties, bytes], None],
) -> Pipeline | None:
    """Put ``channel`` in confirm mode with publishes that do not wait.

    pika's blocking channel waits for each confirm inside ``basic_publish``;
    here confirms reach ``on_confirm(delivery_tag, multiple, refused)`` (a
    nack is refused) and messages the broker returned reach
    ``on_return(routing_key, properties, body)`` (in publish order, each
    before its confirm), from pika's I/O loop.

    Fallback: ``None``, the channel untouched; the caller puts it in confirm
    mode itself (``channel.confirm_delivery()``) and publishes one message
    at a time, each waiting for its confirm.

    Raises:
        pika's errors: the channel could not be put in confirm mode.
    """
    if not FAST_PATHS_ACTIVE:
        return None
    impl = channel._impl
    selected: list[bool] = []

    def confirmed(frame: Any) -> None:
        method = frame.method
        on_confirm(method.delivery_tag, method.multiple, isinstance(method, pika.spec.Basic.Nack))

    def returned(_channel: object, method: Any, properties: Any, body: bytes) -> None:
        on_return(method.routing_key, properties, body)

    impl.add_on_return_callback(returned)
    impl.confirm_delivery(
        ack_nack_callback=confirmed, callback=lambda _frame: selected.append(True)
    )
    channel._flush_output(lambda: bool(selected))
    return Pipeline(channel)


# -- the state of channels and connections -------------------------------------------


def frame_max(connection: pika.BlockingConnection) -> int:
    """The largest frame ``connection`` may send, in bytes, as negotiated
    with the broker (pika keeps it only on its private connection object).

    Not a fast path, and used whatever :data:`ENVIRONMENT_VARIABLE` says: a
    copy larger than this kills the connection. Fallback (pika keeps it
    elsewhere): pika's own largest, ``pika.spec.FRAME_MAX_SIZE`` (131,072
    bytes, RabbitMQ's default), which pika never exceeds when it negotiates.
    """
    params = getattr(getattr(connection, "_impl", None), "params", None)
    value = getattr(params, "frame_max", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return int(pika.spec.FRAME_MAX_SIZE)


def closing_reason(channel: BlockingChannel | None) -> BaseException | None:
    """Why pika closed ``channel``, if it did and said so (e.g. the broker's
    ``ChannelClosedByBroker`` with its reply code).

    pika keeps the reason privately and raises it only from a call that was
    running when the channel closed. Fallback: ``None`` (the caller knows
    the channel is closed, not why).
    """
    if not FAST_PATHS_ACTIVE or channel is None:
        return None
    reason = channel._closing_reason
    return reason if isinstance(reason, BaseException) else None


def abort_connection(connection: pika.BlockingConnection, reason: str) -> bool:
    """End the TCP stream under ``connection`` without the closing handshake
    (which would wait for an answer that may never come), and let pika's
    I/O loop notice (it raises the loss).

    pika has no public "abort". Fallback: nothing is done; the caller
    forgets the connection and pika closes its socket when the connection
    is garbage-collected.

    Returns:
        Whether the stream was ended.
    """
    if not FAST_PATHS_ACTIVE:
        return False
    connection._impl._terminate_stream(pika.exceptions.StreamLostError(reason))
    return True


def ssl_socket(connection: pika.BlockingConnection) -> ssl.SSLSocket | ssl.SSLObject | None:
    """The TLS socket of an open connection; ``None`` when it is plain TCP.

    Fallback: ``None`` also for a TLS connection (pika does not show its
    socket); the caller knows from the parameters whether TLS is on.
    """
    if not FAST_PATHS_ACTIVE:
        return None
    transport = getattr(connection._impl, "_transport", None)  # None once closed
    sock = getattr(transport, "_sock", None)
    return sock if isinstance(sock, (ssl.SSLSocket, ssl.SSLObject)) else None


# -- reading what pika's decoder rejects ---------------------------------------------


#: Longest description (characters) of one header that could not be decoded.
MAX_DESCRIPTION_CHARS: Final = 300
#: Type tags of AMQP field values, and what the description calls them.
_FIELD_KINDS: Final = {
    b"t": "boolean",
    b"b": "short-short int",
    b"B": "short-short unsigned int",
    b"U": "short int",
    b"u": "short unsigned int",
    b"s": "short int",
    b"I": "long int",
    b"i": "long unsigned int",
    b"L": "long-long int",
    b"l": "long-long int",
    b"f": "float",
    b"d": "double",
    b"D": "decimal",
    b"T": "timestamp",
    b"S": "long string",
    b"x": "byte array",
    b"A": "array",
    b"F": "table",
    b"V": "void",
}
#: Payload sizes of the fixed-size field types (the others are length-prefixed).
_FIXED_SIZES: Final = {
    b"t": 1, b"b": 1, b"B": 1, b"U": 2, b"u": 2, b"s": 2, b"I": 4, b"i": 4,
    b"f": 4, b"L": 8, b"l": 8, b"d": 8, b"T": 8, b"D": 5, b"V": 0,
}  # fmt: skip


class UndecodableProperties(pika.BasicProperties):  # type: ignore[misc]  # pika is untyped
    """A delivery's properties with headers pika's decoder rejected.

    Every other property is decoded as pika decodes it. ``headers`` holds
    the headers pika could decode, and :data:`~.._core.headers.UNDECODABLE_HEADERS`:
    a table of the others, each described (type, value or size, pika's
    error). :attr:`reason` says the same in one line.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Header key -> why pika could not decode its value.
        self.undecodable: dict[str, str] = {}

    @property
    def reason(self) -> str:
        """One line: which headers pika could not decode, and why."""
        described = "; ".join(f"{key!r}: {text}" for key, text in self.undecodable.items())
        return f"header(s) pika cannot decode: {described}"


def lenient_decoding(connection: pika.BlockingConnection) -> pika.BlockingConnection:
    """Have ``connection`` read a message whose headers pika cannot decode,
    rather than die on it.

    pika decodes a content header frame inside its frame parsing, and an
    error there (a timestamp past ``datetime``'s range, a table nested
    deeper than Python's recursion limit) ends the connection; the broker
    delivers the message again on the next one, for ever. Here, a content
    header frame pika's decoder rejects is decoded again field by field:
    what pika can decode is kept, each header it cannot is replaced by its
    description (see :class:`UndecodableProperties`), and the delivery
    carries on with its body intact, for the consumer to set aside. Every
    other frame, and every frame pika decodes, is pika's own.

    Not a fast path: on whatever :data:`ENVIRONMENT_VARIABLE` says. Fallback
    (pika lacks :data:`REPAIR_CHECKS`): the connection as pika made it.
    """
    if not LENIENT_DECODING_ACTIVE:
        return connection
    impl = connection._impl
    decode_frame = pika.frame.decode_frame

    def read_frame() -> tuple[int, Any]:
        buffer = impl._frame_buffer
        try:
            return decode_frame(buffer)  # type: ignore[no-any-return]
        except Exception:
            recovered = _decode_header_frame(buffer)
            if recovered is None:
                raise  # not a content header: pika's error, as before
            return recovered

    impl._read_frame = read_frame
    return connection


def _decode_header_frame(buffer: bytes) -> tuple[int, pika.frame.Header] | None:
    """The content header frame at the start of ``buffer``, its headers
    decoded leniently; ``None`` when it is not one whose headers failed."""
    try:
        frame_type, channel_number, size = struct.unpack_from(">BHL", buffer, 0)
        end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
        if frame_type != pika.spec.FRAME_HEADER or end > len(buffer):
            return None
        data = buffer[pika.spec.FRAME_HEADER_SIZE : end - 1]
        class_id, _weight, body_size = struct.unpack_from(">HHQ", data, 0)
        if class_id != pika.spec.BasicProperties.INDEX:
            return None
        properties = _decode_properties(data[12:])
    except Exception:  # could not recover: pika's own error stands
        log.debug("Could not decode a content header frame leniently", exc_info=True)
        return None
    if properties is None:
        return None
    log.info(
        "Received a message with %s; it is handed on with those headers described",
        properties.reason,
    )
    return end, pika.frame.Header(channel_number, body_size, properties)


def _decode_properties(encoded: bytes) -> UndecodableProperties | None:
    flags: int = struct.unpack_from(">H", encoded, 0)[0]
    spec = pika.spec.BasicProperties
    if flags & 1 or not flags & spec.FLAG_HEADERS:
        return None  # a second flag word (not AMQP 0-9-1), or no headers to blame
    offset = 2
    for flag in (spec.FLAG_CONTENT_TYPE, spec.FLAG_CONTENT_ENCODING):  # before the headers
        if flags & flag:
            offset += 1 + encoded[offset]
    (size,) = struct.unpack_from(">I", encoded, offset)
    table_end = offset + 4 + size
    headers, undecodable = _decode_table(encoded, offset + 4, table_end)
    if not undecodable:
        return None
    properties = UndecodableProperties()
    # pika decodes every other property, from the same bytes less the table.
    properties.decode(
        struct.pack(">H", flags & ~spec.FLAG_HEADERS) + encoded[2:offset] + encoded[table_end:]
    )
    headers[_headers.UNDECODABLE_HEADERS] = dict(undecodable)
    properties.headers = headers
    properties.undecodable = undecodable
    return properties


def _decode_table(encoded: bytes, offset: int, end: int) -> tuple[dict[Any, Any], dict[str, str]]:
    """A header table decoded entry by entry: (what pika decodes, key ->
    description of what it does not)."""
    headers: dict[Any, Any] = {}
    undecodable: dict[str, str] = {}
    while offset < end:
        key, offset = pika.data.decode_short_string(encoded, offset)
        shown = key if isinstance(key, str) else key.decode("utf-8", "backslashreplace")
        start = offset
        try:
            headers[key], offset = pika.data.decode_value(encoded, offset)
        except Exception as exc:  # noqa: BLE001  # RecursionError too: any failure is described
            skipped = _value_end(encoded, start)
            undecodable[shown] = _describe(encoded, start, exc, skipped is None)
            if skipped is None:
                break  # its size is unknown: the rest of the table goes with it
            offset = skipped
    return headers, undecodable


def _value_end(encoded: bytes, offset: int) -> int | None:
    """Where the field value at ``offset`` ends (without decoding it);
    ``None`` for a type whose size is unknown."""
    tag = encoded[offset : offset + 1]
    size = _FIXED_SIZES.get(tag)
    if size is not None:
        return offset + 1 + size
    if tag in (b"S", b"x", b"A", b"F"):
        return int(offset + 5 + struct.unpack_from(">I", encoded, offset + 1)[0])
    return None


def _describe(encoded: bytes, offset: int, error: BaseException, rest_dropped: bool) -> str:
    tag = encoded[offset : offset + 1]
    kind = _FIELD_KINDS.get(tag, f"field of unknown type {tag!r}")
    if tag == b"T":
        shown = f"{kind} {struct.unpack_from('>Q', encoded, offset + 1)[0]}"
    elif tag in (b"f", b"d"):
        number = struct.unpack_from(">f" if tag == b"f" else ">d", encoded, offset + 1)[0]
        shown = f"{kind} {number!r}"
    elif tag in (b"S", b"x", b"A", b"F"):
        shown = f"{kind} of {struct.unpack_from('>I', encoded, offset + 1)[0]} bytes"
    else:
        shown = kind
    if rest_dropped:
        shown += " (the headers after it are dropped too)"
    text = f"{shown}: {type(error).__name__}: {error}"
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[: MAX_DESCRIPTION_CHARS - 3] + "..."
    return text


decide_fast_paths()
decide_repairs()
