"""Dead letters as values: what one is, how to pick some, count them, save them.

Everything here works on messages already taken from a dead-letter queue;
nothing talks to the broker. :mod:`domain_event_broker.replay` re-exports the
public names.
"""

from __future__ import annotations

import base64
import binascii
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
            name: getattr(properties, name)
            for name in _PROPERTY_NAMES
            if getattr(properties, name) is not None
        },
    }
    if properties.headers is not None:
        record["headers"] = {key: _encode_value(value) for key, value in properties.headers.items()}
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


def from_record(line: str) -> tuple[str, pika.BasicProperties, bytes]:
    """The routing key, properties and body of an export line.

    Raises:
        ValueError: the line is not a dead letter written by :func:`to_record`.
    """
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        routing_key = record["routing_key"]
        if not isinstance(routing_key, str):
            raise ValueError("routing_key is not a string")
        body = base64.b64decode(record["body"], validate=True)
        values = record.get("properties", {})
        if not isinstance(values, dict) or set(values) - set(_PROPERTY_NAMES):
            raise ValueError("unknown properties")
        headers = record.get("headers")
        if headers is not None and not isinstance(headers, dict):
            raise ValueError("headers is not an object")
        properties = pika.BasicProperties(
            headers=None if headers is None else {k: _decode_value(v) for k, v in headers.items()},
            **values,
        )
    except (KeyError, TypeError, binascii.Error, InvalidOperation) as exc:
        raise ValueError(f"not an exported dead letter: {exc!r}") from exc
    return routing_key, properties, body


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
        table = {str(key): _encode_value(item) for key, item in value.items()}
        if len(table) == 1 and next(iter(table)) in _TAGS:
            return {"$table": table}
        return table
    raise ValueError(f"cannot export a header value of type {type(value).__name__}")


def _decode_value(value: Any) -> Any:  # noqa: PLR0911  # one return per tag
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$bytes":
            return base64.b64decode(inner, validate=True)
        if tag == "$decimal":
            return Decimal(inner)
        if tag == "$datetime":
            return datetime.fromisoformat(inner)
        if tag == "$float":
            return float(inner)
        if tag == "$table":
            return {key: _decode_value(item) for key, item in inner.items()}
    return {key: _decode_value(item) for key, item in value.items()}


def now_or(now: float | None) -> float:
    """``now``, or the current time."""
    return time.time() if now is None else now
