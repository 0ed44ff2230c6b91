"""The :class:`DomainEvent` value object and its JSON wire format."""

from __future__ import annotations

import json
import json.scanner
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Final

from ._core import validate as _validate
from ._core.exceptions import MalformedEventError

__all__ = ["DomainEvent"]

#: The keys of the JSON body, in the order 3.0.2 writes them.
WIRE_KEYS = ("routing_key", "data", "domain_object_id", "uuid_string", "timestamp")

#: ``json.dumps(..., allow_nan=False)``, built once. Its cycle check is left
#: to :func:`_validate.json_value`, which refuses cycles before encoding.
_ENCODER = json.JSONEncoder(allow_nan=False, check_circular=False)


def _one_encoder() -> Callable[[Any], str]:
    """``_ENCODER.encode``, without the C encoder it builds again for every call.

    ``JSONEncoder.iterencode`` makes a new C encoder each time; with no cycle
    check it keeps no state between calls, so one serves every call (the
    same text: same separators, ASCII escapes and ``float.__repr__``).
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - an interpreter without the C accelerator
        return _ENCODER.encode
    iterencode = make(
        None,  # markers: no cycle check
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )
    join = "".join
    return lambda value: join(iterencode(value, 0))


#: What :meth:`DomainEvent.to_json` encodes with.
_encode = _one_encoder()


def _one_scanner() -> Callable[[Any], Any]:
    """``json.loads``, parsing an object text with the C scanner directly.

    ``json.loads`` strips whitespace with a regular expression on both sides
    of the document before it scans it. A body as written by ``to_json`` (an
    object, nothing around it) is scanned straight away; anything else (other
    whitespace, extra data, bytes, a value that is no object) goes through
    ``json.loads``, with its errors.
    """
    make = getattr(json.scanner, "c_make_scanner", None)
    if make is None:  # pragma: no cover - an interpreter without the C accelerator
        return json.loads
    scan = make(json.JSONDecoder())
    loads = json.loads

    def parse(text: Any) -> Any:
        if type(text) is str and text[:1] == "{":
            value, end = scan(text, 0)
            if end == len(text):
                return value
        return loads(text)

    return parse


#: What :meth:`DomainEvent.from_json` decodes with.
_decode = _one_scanner()

#: AMQP limits a routing key (a short string) to 255 bytes.
MAX_ROUTING_KEY_BYTES = _validate.MAX_SHORTSTR_BYTES


def validate_routing_key(routing_key: object) -> str:
    """Return ``routing_key`` if it can be published, else raise ``ValueError``."""
    return _validate.routing_key(routing_key)


def check_event(event: DomainEvent) -> str:
    """Check every field of ``event`` against the boundary rules; return its JSON body.

    Raises:
        ValueError: the routing key is invalid, the timestamp is not finite,
            ``uuid_string`` is too long, or the data is not strict JSON
            (NaN, infinity, nested too deep).
        TypeError: the timestamp is not a number, ``uuid_string`` not a
            str, or the data not JSON-serializable.
    """
    _validate.routing_key(event.routing_key)
    _validate.uuid_string(event.uuid_string)
    _validate.timestamp(event.timestamp)
    return event.to_json()


def new_event(
    routing_key: str,
    data: Any,
    domain_object_id: str | None = None,
    uuid_string: str | None = None,
    timestamp: float | None = None,
) -> tuple[DomainEvent, str]:
    """Check and create an event to publish; return it with its JSON body.

    Raises:
        ValueError: the routing key is empty, not a str, or too long; the
            data is not strict JSON; the timestamp is not finite.
        TypeError: ``data`` is not JSON-serializable, ``uuid_string`` not a
            str, or ``timestamp`` not a number.
    """
    event = DomainEvent(
        routing_key=routing_key,
        data=data,
        domain_object_id=domain_object_id,
        uuid_string=uuid_string,
        timestamp=timestamp,
    )
    return event, check_event(event)


class _EmptyData:
    """Default of ``DomainEvent(data=...)``: a fresh ``{}`` per event.

    A sentinel rather than ``None`` because 3.0.2 kept an explicit ``None``
    (it is sent as ``"data": null``); its repr makes signatures read as 3.0.2's.
    """

    def __repr__(self) -> str:
        return "{}"


_EMPTY_DATA: Any = _EmptyData()


#: The hex digit of a UUID's variant field (RFC 4122: binary 10xx), by the
#: random hex digit it replaces.
_VARIANT_DIGIT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _new_uuid_string() -> str:
    """``str(uuid.uuid4())``, without building a ``UUID`` (publishing's hot path)."""
    digits = os.urandom(16).hex()
    return (
        f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-"
        f"{_VARIANT_DIGIT[digits[16]]}{digits[17:20]}-{digits[20:]}"
    )


def _now() -> float:
    # Whole microseconds, as 3.0.2 wrote them (at most six decimals in JSON).
    return time.time_ns() // 1000 / 1_000_000


class DomainEvent:
    """A fact that happened in one domain, such as ``user.registered``.

    Args:
        routing_key: ``<domain>.<event_type>``, e.g. ``user.registered``.
        data: the event's payload; must be JSON-serializable. Default: a
            new empty dict (an explicit ``None`` is kept, as in 3.0.2).
        domain_object_id: optional identifier of the domain object concerned.
        uuid_string: the event's unique id; a new UUID4 when left out.
        timestamp: Unix seconds (UTC); now when left out.
        retries: how many times the receiving handler already asked to retry
            this event (set by the subscriber).
        redelivered: whether the broker delivered this event before (set by
            the subscriber; the handler may have seen it already).
        **kwargs: unknown keys from a newer writer's JSON body; ignored.

    Two events are equal when their :attr:`event_data` are equal.
    """

    def __init__(
        self,
        routing_key: str = "",
        data: Any = _EMPTY_DATA,
        domain_object_id: str | None = None,
        uuid_string: str | None = None,
        timestamp: float | None = None,
        retries: int = 0,
        *,
        redelivered: bool = False,
        **kwargs: Any,
    ) -> None:
        self.routing_key = routing_key
        self.data: Any = {} if data is _EMPTY_DATA else data
        self.domain_object_id = domain_object_id
        self.uuid_string: str = _new_uuid_string() if uuid_string is None else uuid_string
        self.timestamp: float = _now() if timestamp is None else timestamp
        self.retries = retries
        self.redelivered = redelivered

    @property
    def event_data(self) -> dict[str, Any]:
        """The event as the dict that goes on the wire (3.0.2's keys and order,
        as in :data:`WIRE_KEYS`)."""
        return {
            "routing_key": self.routing_key,
            "data": self.data,
            "domain_object_id": self.domain_object_id,
            "uuid_string": self.uuid_string,
            "timestamp": self.timestamp,
        }

    @property
    def datetime(self) -> datetime:
        """:attr:`timestamp` as a timezone-aware UTC datetime.

        Raises:
            TypeError: the timestamp is not a number.
            ValueError: it is not a date Python can represent (e.g. NaN, or
                beyond the year 9999), as a received event's may be.

        .. versionadded:: 4.0
        """
        try:
            return datetime.fromtimestamp(self.timestamp, tz=timezone.utc)
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(
                f"timestamp {self.timestamp!r:.40} is not a representable date"
            ) from exc

    def to_json(self) -> str:
        """Serialize the event to its JSON wire format (byte-compatible with 3.0.2).

        The JSON is strict (RFC 8259): no ``NaN`` or ``Infinity``, only
        ``str`` keys, at most 100 levels deep.

        Raises:
            TypeError: ``data`` (or another field) is not JSON-serializable.
            ValueError: it holds NaN or an infinity, or is nested too deep.

        .. versionadded:: 4.0
        .. versionchanged:: 4.1
           Strict JSON: NaN, infinities, non-str keys and deep nesting are refused.
        """
        event_data = self.event_data
        try:
            _validate.json_value(event_data, "event")
        except TypeError as exc:
            raise TypeError(
                f"domain event {str(self.routing_key)[:255]!r} is not JSON-serializable: {exc}"
            ) from None
        except ValueError as exc:
            raise ValueError(
                f"domain event {str(self.routing_key)[:255]!r} is not strict JSON: {exc}"
            ) from None
        return _encode(event_data)

    @classmethod
    def from_json(cls, json_data: str | bytes | bytearray) -> DomainEvent:
        """Create a DomainEvent from its JSON wire format.

        Unknown keys are ignored, so that a newer writer may add some.

        Raises:
            MalformedEventError: the input is not UTF-8 JSON, not an object,
                or has no string ``routing_key``; also a ``ValueError``.
        """
        try:
            decoded = _decode(json_data)
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            raise MalformedEventError(f"not a JSON document: {exc}") from exc
        except RecursionError:
            raise MalformedEventError("not a JSON document: nested too deeply") from None
        if not isinstance(decoded, dict):
            raise MalformedEventError(f"expected a JSON object, got {type(decoded).__name__}")
        routing_key = decoded.get("routing_key")
        if not isinstance(routing_key, str):
            raise MalformedEventError("the JSON object has no string 'routing_key'")
        timestamp = decoded.get("timestamp")
        if timestamp is not None and (
            isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))
        ):
            raise MalformedEventError("'timestamp' must be a number")
        uuid_string = decoded.get("uuid_string")
        if uuid_string is not None and not isinstance(uuid_string, str):
            raise MalformedEventError("'uuid_string' must be a string")
        known = {key: decoded[key] for key in WIRE_KEYS if key in decoded}
        return cls(**known)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DomainEvent):
            return NotImplemented
        return self.event_data == other.event_data

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return (
            f"DomainEvent(routing_key={self.routing_key!r}, uuid_string={self.uuid_string!r}, "
            f"domain_object_id={self.domain_object_id!r}, timestamp={self.timestamp!r}, "
            f"retries={self.retries!r})"
        )
