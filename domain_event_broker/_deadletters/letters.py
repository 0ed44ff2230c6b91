"""Dead letters as values: what one is, how to pick some, count them, save them.

Everything here works on messages already taken from a dead-letter queue;
nothing talks to the broker. :mod:`domain_event_broker.replay` re-exports the
public names.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import pika
import pika.data

from .._core import headers as _headers
from .._core.topic import topic_matches
from ..errors import MalformedEventError
from ..events import DomainEvent

__all__ = [
    "AGE_BUCKETS",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterSummary",
    "failure_reason",
    "parse_age",
    "topic_matches",
]

ORIGINAL_ROUTING_KEY: Final = _headers.ORIGINAL_ROUTING_KEY
#: Header a quorum queue adds on redelivery: the broker's, not the event's.
DELIVERY_COUNT: Final = "x-delivery-count"
#: The same from RabbitMQ 4.3 on, counting every return to the queue
#: (``basic.nack`` and consumer timeouts included).
ACQUIRED_COUNT: Final = "x-acquired-count"
#: Headers a quorum queue adds on redelivery.
REDELIVERY_HEADERS: Final = frozenset({DELIVERY_COUNT, ACQUIRED_COUNT})

#: Headers this library or the broker adds to a dead letter while it is
#: managed; they are hidden from callbacks, filters, exports and replayed copies.
_INTERNAL_HEADERS: Final = frozenset({ORIGINAL_ROUTING_KEY, *REDELIVERY_HEADERS})


# -- one dead letter ------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered event, as :func:`inspect_dead_letters` saw it.

    Attributes:
        routing_key: the routing key it was dead-lettered with (its event's).
        body: the raw message body.
        properties: the AMQP properties, headers included.
        event: the decoded event, or ``None`` when the body is not one.

    .. versionadded:: 4.0
    """

    routing_key: str
    body: bytes
    properties: pika.BasicProperties = field(repr=False)
    event: DomainEvent | None = field(repr=False)

    @property
    def headers(self) -> Mapping[str, Any]:
        """The message's AMQP headers (empty when it has none)."""
        return self.properties.headers or {}

    @property
    def uuid_string(self) -> str | None:
        """The event's uuid, or the message id of a malformed body."""
        if self.event is not None:
            return self.event.uuid_string
        message_id = self.properties.message_id
        return message_id if isinstance(message_id, str) else None

    @property
    def retry_count(self) -> int:
        """How many retries the handler had asked for before it gave up."""
        return _headers.retry_count(self.headers)

    @property
    def exception_type(self) -> str | None:
        """Qualified class name of the exception that dead-lettered the event."""
        return _text_header(self.headers, _headers.EXCEPTION_TYPE)

    @property
    def exception_message(self) -> str | None:
        """The message of that exception."""
        return _text_header(self.headers, _headers.EXCEPTION_MESSAGE)

    @property
    def exception_traceback(self) -> str | None:
        """Its traceback (possibly truncated)."""
        return _text_header(self.headers, _headers.EXCEPTION_TRACEBACK)

    @property
    def failed_handler(self) -> str | None:
        """The handler that failed."""
        return _text_header(self.headers, _headers.FAILED_HANDLER)

    @property
    def failed_at(self) -> float | None:
        """When it was dead-lettered (Unix seconds), if known.

        From this library's ``x-failed-at`` header, else from RabbitMQ's
        ``x-death`` header (dead letters of 3.0.2).
        """
        value = self.headers.get(_headers.FAILED_AT)
        if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, (str, bytes)):
            try:
                return float(value)
            except ValueError:
                pass
        death = _first_death(self.headers)
        when = death.get("time") if death else None
        if isinstance(when, datetime):
            return when.timestamp()
        return None

    @property
    def reason(self) -> str:
        """Why the event was dead-lettered, in one line."""
        return failure_reason(self.properties)

    def age(self, now: float | None = None) -> float | None:
        """How long ago the event was dead-lettered.

        Args:
            now: the current time (Unix seconds); default: now.

        Returns:
            Seconds since it was dead-lettered, else since it was published,
            or ``None`` when neither is known.
        """
        since = self.failed_at
        if since is None and self.event is not None:
            since = self.event.timestamp
        if since is None:
            return None
        return max(0.0, (time.time() if now is None else now) - since)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-serializable summary (what ``inspect --json`` prints)."""
        return {
            "routing_key": self.routing_key,
            "uuid_string": self.uuid_string,
            "age_seconds": self.age(now),
            "failed_at": self.failed_at,
            "reason": self.reason,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
            "exception_traceback": self.exception_traceback,
            "failed_handler": self.failed_handler,
            "retry_count": self.retry_count,
            "event": None if self.event is None else self.event.event_data,
            "body": None if self.event is not None else self.body.decode("utf-8", "replace"),
        }

    @classmethod
    def from_message(
        cls, routing_key: str, properties: pika.BasicProperties | None, body: bytes
    ) -> DeadLetter:
        """The dead letter of a message taken from a dead-letter queue.

        Args:
            routing_key: the routing key it was delivered with.
            properties: its AMQP properties.
            body: its body.

        Returns:
            The dead letter, with its own routing key and headers even if
            this library moved it within its queue before.

        .. versionadded:: 4.1
        """
        key, clean = logical_view(routing_key, properties)
        return cls(routing_key=key, body=body, properties=clean, event=decode_event(body))


def failure_reason(properties: pika.BasicProperties | None) -> str:
    """Why a dead letter failed, in one line, from its headers.

    Args:
        properties: the dead letter's AMQP properties.

    Returns:
        ``"<exception type>: <message>"`` when this library dead-lettered it,
        RabbitMQ's reason (e.g. ``"rejected"``) for dead letters of 3.0.2,
        else ``"unknown"``.

    .. versionadded:: 4.0
    """
    headers: Mapping[str, Any] = (properties.headers if properties is not None else None) or {}
    exception_type = _text_header(headers, _headers.EXCEPTION_TYPE)
    if exception_type:
        message = _text_header(headers, _headers.EXCEPTION_MESSAGE)
        first_line = message.strip().splitlines()[0] if message and message.strip() else ""
        return f"{exception_type}: {first_line}" if first_line else exception_type
    death = _first_death(headers)
    if death and death.get("reason"):
        reason = death["reason"]
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        return f"{reason} by queue {_text(death.get('queue')) or '?'} (no exception recorded)"
    return "unknown"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def _text_header(headers: Mapping[str, Any], key: str) -> str | None:
    return _text(headers.get(key))


def _first_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def decode_event(body: bytes) -> DomainEvent | None:
    """The event in ``body``, or ``None`` when it is not one."""
    try:
        return DomainEvent.from_json(body)
    except MalformedEventError:
        return None


def logical_view(
    routing_key: str, properties: pika.BasicProperties | None
) -> tuple[str, pika.BasicProperties]:
    """A dead letter's own routing key and properties, without the headers
    this library or the broker added while it waited in its queue."""
    if properties is None:
        return routing_key, pika.BasicProperties()
    headers = properties.headers
    if not headers or not _INTERNAL_HEADERS.intersection(headers):
        return routing_key, properties
    original = _text(headers.get(ORIGINAL_ROUTING_KEY))
    kept = {key: value for key, value in headers.items() if key not in _INTERNAL_HEADERS}
    copy = _headers.copy_properties(properties, kept, keep_expiration=True)
    return (original if original is not None else routing_key), copy


def parked_properties(properties: pika.BasicProperties, routing_key: str) -> pika.BasicProperties:
    """``properties`` of a dead letter (logical view) for its copy moved to
    the tail of its queue through the default exchange: every property and
    header kept, plus its routing key in :data:`ORIGINAL_ROUTING_KEY`."""
    headers = dict(properties.headers or {})
    headers[ORIGINAL_ROUTING_KEY] = routing_key
    copy = _headers.copy_properties(properties, headers)
    return copy


# -- picking dead letters -----------------------------------------------------------


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """Seconds in an age such as ``90``, ``90s``, ``15m``, ``1h``, ``2d``, ``1w``.

    Raises:
        ValueError: ``text`` is not such an age.

    .. versionadded:: 4.1
    """
    found = _AGE.match(text)
    if found is None:
        raise ValueError(f"not an age: {text!r} (expected e.g. 90s, 15m, 1h, 2d)")
    return float(found.group(1)) * _UNIT_SECONDS[(found.group(2) or "s").lower()]


def _texts(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{what} must be non-empty strings, not {item!r}")
    return items


def _optional_age(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{what} must be a non-negative number of seconds, not {value!r}")
    if math.isinf(value):
        raise ValueError(f"{what} must be finite, not {value!r}")
    return float(value)


@dataclass(frozen=True, init=False)
class DeadLetterFilter:
    """Which dead letters a replay, discard or summary is about.

    Every criterion given must hold (and); within one criterion, any of the
    values given may match (or). No criterion at all matches every dead
    letter.

    Args:
        exception: exception types: the qualified name in the
            ``x-exception-type`` header (``builtins.KeyError``), or its
            class name alone (``KeyError``).
        handler: failing handlers (``x-failed-handler``), exact names.
        routing_key: topic patterns (``user.*``, ``billing.#``) the dead
            letter's routing key must match.
        older_than: dead-lettered at least this many seconds ago.
        newer_than: dead-lettered less than this many seconds ago.

    A dead letter whose age is unknown matches neither ``older_than`` nor
    ``newer_than``; one without the header matches no ``exception`` or
    ``handler``.

    Raises:
        ValueError: a value of the wrong type, or an empty one.

    .. versionadded:: 4.1
    """

    exception: tuple[str, ...]
    handler: tuple[str, ...]
    routing_key: tuple[str, ...]
    older_than: float | None
    newer_than: float | None

    def __init__(
        self,
        *,
        exception: str | Iterable[str] | None = None,
        handler: str | Iterable[str] | None = None,
        routing_key: str | Iterable[str] | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
    ) -> None:
        object.__setattr__(self, "exception", _texts(exception, "exception"))
        object.__setattr__(self, "handler", _texts(handler, "handler"))
        object.__setattr__(self, "routing_key", _texts(routing_key, "routing_key"))
        object.__setattr__(self, "older_than", _optional_age(older_than, "older_than"))
        object.__setattr__(self, "newer_than", _optional_age(newer_than, "newer_than"))

    @property
    def matches_everything(self) -> bool:
        """Whether no criterion was given."""
        return not (
            self.exception
            or self.handler
            or self.routing_key
            or self.older_than is not None
            or self.newer_than is not None
        )

    def matches(self, letter: DeadLetter, now: float | None = None) -> bool:  # noqa: PLR0911  # one return per criterion reads best
        """Whether ``letter`` is one of the dead letters this filter picks.

        Args:
            letter: the dead letter.
            now: the current time (Unix seconds); default: now.
        """
        if self.exception:
            found = letter.exception_type
            if found is None or not any(
                found == wanted or found.endswith("." + wanted) for wanted in self.exception
            ):
                return False
        if self.handler and letter.failed_handler not in self.handler:
            return False
        if self.routing_key and not any(
            topic_matches(pattern, letter.routing_key) for pattern in self.routing_key
        ):
            return False
        if self.older_than is not None or self.newer_than is not None:
            age = letter.age(now)
            if age is None:
                return False
            if self.older_than is not None and age < self.older_than:
                return False
            if self.newer_than is not None and age >= self.newer_than:
                return False
        return True

    def describe(self) -> str:
        """The criteria in one line, e.g. ``exception=KeyError, older than 3600s``."""
        parts = [f"exception={value}" for value in self.exception]
        parts += [f"handler={value}" for value in self.handler]
        parts += [f"routing key {value}" for value in self.routing_key]
        if self.older_than is not None:
            parts.append(f"older than {self.older_than:g}s")
        if self.newer_than is not None:
            parts.append(f"newer than {self.newer_than:g}s")
        return ", ".join(parts) or "all"


# -- counting dead letters ----------------------------------------------------------

#: Upper bounds (seconds) and labels of the age buckets of a summary.
AGE_BUCKETS: Final = (
    (60.0, "< 1m"),
    (600.0, "1m-10m"),
    (3600.0, "10m-1h"),
    (86400.0, "1h-1d"),
    (604800.0, "1d-7d"),
    (math.inf, ">= 7d"),
)
#: The bucket of dead letters whose age, exception or handler is unknown.
UNKNOWN: Final = "(unknown)"
#: Distinct values counted per field, at most; the rest are counted together.
MAX_DISTINCT: Final = 1000
#: The bucket of values past :data:`MAX_DISTINCT`.
OTHER: Final = "(other)"


@dataclass
class DeadLetterSummary:
    """Counts of dead letters by exception type, failing handler, routing key
    and age, made in one pass in bounded memory (:data:`MAX_DISTINCT`
    values per field).

    Attributes:
        total: dead letters counted.
        scanned: dead letters looked at (a filter may leave some uncounted).
        by_exception: count per exception type (:data:`UNKNOWN`: none recorded).
        by_handler: count per failing handler.
        by_routing_key: count per routing key.
        by_age: count per age bucket (:data:`AGE_BUCKETS`), youngest first.
        oldest: age of the oldest dead letter (seconds), if any is known.
        newest: age of the newest one.

    .. versionadded:: 4.1
    """

    total: int = 0
    scanned: int = 0
    by_exception: Counter[str] = field(default_factory=Counter)
    by_handler: Counter[str] = field(default_factory=Counter)
    by_routing_key: Counter[str] = field(default_factory=Counter)
    by_age: Counter[str] = field(default_factory=Counter)
    oldest: float | None = None
    newest: float | None = None

    def add(self, letter: DeadLetter, now: float | None = None) -> None:
        """Count one dead letter."""
        self.total += 1
        _count(self.by_exception, letter.exception_type or UNKNOWN)
        _count(self.by_handler, letter.failed_handler or UNKNOWN)
        _count(self.by_routing_key, letter.routing_key)
        age = letter.age(now)
        if age is None:
            self.by_age[UNKNOWN] += 1
            return
        self.by_age[age_bucket(age)] += 1
        self.oldest = age if self.oldest is None else max(self.oldest, age)
        self.newest = age if self.newest is None else min(self.newest, age)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable form (what ``inspect --summary --json`` prints)."""
        labels = [label for _, label in AGE_BUCKETS] + [UNKNOWN]
        return {
            "total": self.total,
            "scanned": self.scanned,
            "by_exception": dict(self.by_exception.most_common()),
            "by_handler": dict(self.by_handler.most_common()),
            "by_routing_key": dict(self.by_routing_key.most_common()),
            "by_age": {label: self.by_age[label] for label in labels if self.by_age[label]},
            "oldest_seconds": self.oldest,
            "newest_seconds": self.newest,
        }


def _count(counter: Counter[str], key: str) -> None:
    if key in counter or len(counter) < MAX_DISTINCT:
        counter[key] += 1
    else:
        counter[OTHER] += 1


def age_bucket(age: float) -> str:
    """The label of the :data:`AGE_BUCKETS` bucket of ``age`` seconds."""
    for bound, label in AGE_BUCKETS:
        if age < bound:
            return label
    return AGE_BUCKETS[-1][1]


# -- saving dead letters --------------------------------------------------------------

#: The AMQP properties written to an export, headers aside.
_PROPERTY_NAMES: Final = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)
#: Tags of header values JSON cannot hold as they are.
_TAGS: Final = frozenset({"$bytes", "$decimal", "$datetime", "$float", "$table"})


def to_record(letter: DeadLetter) -> str:
    """One line of an export: the dead letter as a JSON object.

    The body is base64 (exact bytes); every property is kept, and header
    values JSON cannot hold exactly are tagged (``{"$bytes": ...}``,
    ``{"$decimal": ...}``, ``{"$datetime": ...}``, ``{"$float": ...}``).
    """
    properties = letter.properties
    record: dict[str, Any] = {
        "routing_key": letter.routing_key,
        "body": base64.b64encode(letter.body).decode("ascii"),
        "properties": {
            name: _encode_key(value) if isinstance(value, bytes) else value
            for name in _PROPERTY_NAMES
            if (value := getattr(properties, name)) is not None
        },
    }
    if properties.headers is not None:
        record["headers"] = {
            _encode_key(key): _encode_value(value) for key, value in properties.headers.items()
        }
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


#: The longest AMQP short string, in bytes of UTF-8: a property's value, a
#: header's name, a routing key.
SHORT_STRING_MAX: Final = 255
#: The longest ``expiration`` RabbitMQ accepts (ms): ten years.
EXPIRATION_MAX_MS: Final = 315_360_000_000
#: Properties that are numbers, and their ranges (octets; a 64-bit timestamp).
_NUMBER_PROPERTIES: Final = {
    "delivery_mode": (0, 255),
    "priority": (0, 255),
    "timestamp": (0, 2**64 - 1),
}
#: The range of an integer header value (AMQP's signed 64-bit integer).
_HEADER_INTEGERS: Final = (-(2**63), 2**63 - 1)
#: Bytes of a content header frame besides the properties (class, weight,
#: body size) and of any frame (type, channel, size, end marker).
_HEADER_FRAME_OVERHEAD: Final = 12 + 8


class RecordError(ValueError):
    """One line of an export cannot be imported; ``field`` says where
    (``routing_key``, ``properties.priority``, ``headers['x-a'][2]``, ...)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


def from_record(line: str) -> tuple[str, pika.BasicProperties, bytes]:
    """The routing key, properties and body of an export line.

    Only the line's form is checked here; :func:`check_sendable` checks that
    what it holds can be sent.

    Raises:
        RecordError: (a :exc:`ValueError`) the line is not a dead letter
            written by :func:`to_record`; it names the field.
    """
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise RecordError("", f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise RecordError("", "not a JSON object (an exported dead letter)")
    for key in ("routing_key", "body"):
        if key not in record:
            raise RecordError(key, "missing")
    routing_key = record["routing_key"]
    if not isinstance(routing_key, str):
        raise RecordError("routing_key", f"not a string but {_kind(routing_key)}")
    encoded_body = record["body"]
    if not isinstance(encoded_body, str):
        raise RecordError("body", f"not a base64 string but {_kind(encoded_body)}")
    try:
        body = base64.b64decode(encoded_body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordError("body", f"not base64 ({exc})") from None
    values = record.get("properties", {})
    if not isinstance(values, dict):
        raise RecordError("properties", f"not an object but {_kind(values)}")
    for name in values:
        if name not in _PROPERTY_NAMES:
            raise RecordError(f"properties.{name}", "not an AMQP property of a message")
    headers = record.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise RecordError("headers", f"not an object but {_kind(headers)}")
    values = {
        name: _decode_key(value) if isinstance(value, str) else value
        for name, value in values.items()
    }
    properties = pika.BasicProperties(
        headers=None if headers is None else _decode_table(headers, "headers"), **values
    )
    return routing_key, properties, body


def check_sendable(properties: pika.BasicProperties, routing_key: str) -> int:
    """Check a dead letter's properties and routing key as pika's encoder and
    the broker will: types and ranges of the properties, 255-byte short
    strings (property values, header names, the routing key), header values
    at any depth (integers, decimals, times, text), an ``expiration``
    RabbitMQ accepts. Then encode the properties of its parked copy, the
    last word.

    Returns:
        The size of the content header frame (bytes), which must not exceed
        the connection's ``frame_max``.

    Raises:
        RecordError: something cannot be sent; it names the field. (A
            ``user_id`` that is not the sending user's is refused by the
            broker only.)
    """
    _short_string(routing_key, "routing_key")
    for name in _PROPERTY_NAMES:
        value = getattr(properties, name)
        if value is not None:
            _check_property(name, value)
    headers = properties.headers
    if headers is not None:
        if not isinstance(headers, Mapping):
            raise RecordError("headers", f"not a table but {type(headers).__name__}")
        _check_table(headers, "headers")
    try:
        encoded = parked_properties(properties, routing_key).encode()
    except Exception as exc:  # noqa: BLE001  # whatever pika's encoder raises: struct.error, ...
        raise RecordError("properties", f"pika cannot encode them ({exc!r:.200})") from None
    return _HEADER_FRAME_OVERHEAD + sum(len(piece) for piece in encoded)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _text_bytes(value: str, field: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(field, "not valid UTF-8 text (a lone surrogate)") from None


def _short_string(value: object, field: str) -> None:
    if isinstance(value, bytes):
        size = len(value)
    elif isinstance(value, str):
        size = len(_text_bytes(value, field))
    else:
        raise RecordError(field, f"not a string but {_kind(value)}")
    if size > SHORT_STRING_MAX:
        raise RecordError(field, f"{size} bytes long; AMQP allows at most {SHORT_STRING_MAX}")


def _check_property(name: str, value: object) -> None:
    field = f"properties.{name}"
    if name in _NUMBER_PROPERTIES:
        low, high = _NUMBER_PROPERTIES[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(field, f"not a whole number but {_kind(value)}")
        if not low <= value <= high:
            raise RecordError(field, f"{value} is out of range ({low} to {high})")
        if name == "delivery_mode" and value not in (1, 2):
            raise RecordError(
                field, f"{value}: RabbitMQ before 4.3 accepts only 1 (transient) or 2 (persistent)"
            )
        return
    _short_string(value, field)
    if name == "expiration":
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if not (text.isascii() and text.isdigit() and int(text) <= EXPIRATION_MAX_MS):
            # RabbitMQ closes the channel on any other expiration.
            raise RecordError(
                field,
                f"{text[:40]!r} is not a number of milliseconds from 0 to {EXPIRATION_MAX_MS}",
            )


def _check_table(table: Mapping[Any, Any], field: str) -> None:
    for key, value in table.items():
        _short_string(key, f"{field}: the name {str(key)[:40]!r}")
        _check_value(value, f"{field}[{key!r:.60}]")


def _check_value(value: Any, field: str) -> None:  # noqa: PLR0911  # one branch per type
    if value is None or isinstance(value, (bool, bytes)):
        return
    if isinstance(value, str):
        _text_bytes(value, field)
        return
    if isinstance(value, int):
        low, high = _HEADER_INTEGERS
        if not low <= value <= high:
            raise RecordError(field, "an integer beyond AMQP's signed 64-bit range")
        return
    if isinstance(value, float):
        raise RecordError(field, "a floating-point number, which pika cannot send in a header")
    if isinstance(value, Decimal):
        _check_encoder(
            value,
            field,
            "a decimal AMQP cannot carry (a signed 32-bit number "
            "of units, at most 255 decimal places)",
        )
        return
    if isinstance(value, datetime):
        try:
            seconds = calendar.timegm(value.utctimetuple())
        except (OverflowError, ValueError):
            seconds = -1
        if seconds < 0:
            raise RecordError(
                field, f"the time {value.isoformat()} is before 1970 (AMQP cannot carry it)"
            )
        _check_encoder(value, field, "a time AMQP cannot carry")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(item, f"{field}[{index}]")
        return
    if isinstance(value, Mapping):
        _check_table(value, field)
        return
    raise RecordError(field, f"a {type(value).__name__}, which AMQP cannot carry")


def _check_encoder(value: Any, field: str, problem: str) -> None:
    """Refuse ``value`` if pika's encoder does (ranges of decimals and times)."""
    try:
        pika.data.encode_value([], value)
    except Exception:  # noqa: BLE001  # whatever the encoder raises: struct.error, TypeError, ...
        raise RecordError(field, f"{problem}: {value}"[:200]) from None


def _encode_value(value: Any) -> Any:  # noqa: PLR0911  # one return per type
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, (list, tuple)):
        return [_encode_value(item) for item in value]
    if isinstance(value, Mapping):
        table = {_encode_key(key): _encode_value(item) for key, item in value.items()}
        if len(table) == 1 and next(iter(table)) in _TAGS:
            return {"$table": table}
        return table
    raise ValueError(f"cannot export a header value of type {type(value).__name__}")


def _encode_key(key: str | bytes) -> str:
    """A table key as JSON can hold it: a key that was not UTF-8 (pika hands
    it over as ``bytes``) keeps its bytes as lone surrogates (Python's
    ``surrogateescape``), which JSON writes as ``\\udcXX`` escapes."""
    if isinstance(key, bytes):
        return key.decode("utf-8", "surrogateescape")
    return str(key)


def _decode_key(key: str) -> str | bytes:
    """The inverse of :func:`_encode_key`: escaped bytes are bytes again."""
    if any("\udc80" <= char <= "\udcff" for char in key):
        try:
            return key.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # other lone surrogates: refused when checked
            return key
    return key


def _decode_table(table: dict[str, Any], field: str) -> dict[Any, Any]:
    return {
        _decode_key(key): _decode_value(value, f"{field}[{key!r:.60}]")
        for key, value in table.items()
    }


def _decode_value(value: Any, field: str) -> Any:
    if isinstance(value, list):
        return [_decode_value(item, f"{field}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag in _TAGS:
            return _decode_tagged(tag, inner, field)
    return _decode_table(value, field)


def _decode_tagged(tag: str, inner: Any, field: str) -> Any:  # one per tag
    if tag == "$table":
        if not isinstance(inner, dict):
            raise RecordError(field, f"{tag} holds {_kind(inner)}, not an object")
        return _decode_table(inner, field)
    if not isinstance(inner, str):
        raise RecordError(field, f"{tag} holds {_kind(inner)}, not a string")
    try:
        if tag == "$bytes":
            return base64.b64decode(inner, validate=True)
        if tag == "$decimal":
            return Decimal(inner)
        if tag == "$float":
            return float(inner)
        return datetime.fromisoformat(inner)
    except (binascii.Error, InvalidOperation, ValueError):
        raise RecordError(field, f"{inner[:40]!r} is not a valid {tag}") from None


def now_or(now: float | None) -> float:
    """``now``, or the current time."""
    return time.time() if now is None else now
