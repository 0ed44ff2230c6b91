"""One boundary check for everything a user passes in.

Publishing, subscribing and the command line call these functions before
anything is sent or declared, so that what one side accepts the other accepts
too, and so that no value reaches pika that pika cannot encode (pika would
raise its own exceptions, or RabbitMQ would close the connection).

The rules (also stated in ``docs/errors.rst``):

* routing keys and binding keys: a non-empty ``str`` of at most 255 bytes in
  UTF-8 (an AMQP short string); otherwise :exc:`ValueError`;
* handler (queue) names: the same, at most :data:`MAX_NAME_BYTES` bytes so that
  the derived names (``-retry``, ``-dlx``, ``-dl``, ``-delay-<ms>``) stay
  within 255, and not starting with ``amq.`` (reserved by RabbitMQ:
  :exc:`~domain_event_broker.ConfigurationError`);
* header keys: ``str`` of at most 255 bytes in UTF-8; header values: ``str``,
  ``bytes``, ``bool``, ``int`` within signed 64 bits, ``None``,
  :class:`~decimal.Decimal` (finite, as AMQP carries it: at most 255 decimal
  places and an unscaled value within signed 32 bits),
  :class:`~datetime.datetime` (from 1970 on), and ``dict``/``list`` of these,
  at most :data:`MAX_DEPTH` levels deep, and :data:`MAX_HEADERS_BYTES` bytes
  encoded. ``float`` is refused with :exc:`TypeError`: pika cannot encode it
  (send ``str(value)`` or a ``Decimal``);
* ``uuid_string``: a ``str`` of at most 255 bytes in UTF-8 (it is also the
  AMQP ``message_id``);
* ``timestamp``: a finite real number (``int`` or ``float``, not ``bool``);
* event data and ``domain_object_id``: strict JSON (RFC 8259): ``dict`` with
  ``str`` keys, ``list``, ``tuple``, ``str``, ``int``, finite ``float``,
  ``bool``, ``None``, at most :data:`MAX_DEPTH` levels deep.

Wrong types raise :exc:`TypeError`, wrong values :exc:`ValueError`, with one
exception kept from 3.0.2's documented behaviour: a routing key, binding key
or name that is not a ``str`` is a :exc:`ValueError`.
"""

from __future__ import annotations

import calendar
import decimal
import math
import struct
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import pika
import pika.data
import pika.exceptions

from .exceptions import ConfigurationError

#: AMQP short strings (routing keys, names, header keys) hold 255 bytes.
MAX_SHORTSTR_BYTES: Final = 255
#: Longest handler name, so that ``name-delay-<ms>`` stays a short string.
MAX_NAME_BYTES: Final = 200
#: Prefix RabbitMQ reserves for its own exchanges and queues.
RESERVED_PREFIX: Final = "amq."
#: Deepest nesting accepted in event data and in header tables.
MAX_DEPTH: Final = 100
#: Largest encoded header table accepted from a user. A content header frame
#: must fit RabbitMQ's frame size (128 KiB by default), and a dead letter adds
#: its own headers (traceback and message, about 10 KB) to the user's.
MAX_HEADERS_BYTES: Final = 65_536

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_UINT64_MAX: Final = 2**64 - 1


def _utf8_length(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None


def short_string(value: object, what: str) -> str:
    """``value`` if it is a non-empty ``str`` of at most 255 bytes in UTF-8.

    Raises:
        ValueError: it is not a str, empty, or too long.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if _utf8_length(value, what) > MAX_SHORTSTR_BYTES:
        raise ValueError(f"{what} is longer than {MAX_SHORTSTR_BYTES} bytes in UTF-8")
    return value


def routing_key(value: object) -> str:
    """A routing key to publish with.

    Raises:
        ValueError: not a str, empty, or longer than 255 bytes in UTF-8.
    """
    return short_string(value, "routing_key")


def binding_keys(value: object) -> tuple[str, ...]:
    """The binding keys of a handler, as a tuple.

    Raises:
        TypeError: not a list (or other iterable).
        ValueError: one str instead of a list, no key, or a key that is not
            a non-empty str of at most 255 bytes in UTF-8.
    """
    if isinstance(value, (str, bytes)):
        raise ValueError("binding_keys must be a list of str, not one str")
    if not isinstance(value, Iterable):
        raise TypeError(f"binding_keys must be a list of str, not {type(value).__name__}")
    keys = tuple(value)
    if not keys:
        raise ValueError("binding_keys must hold at least one binding key")
    for key in keys:
        short_string(key, "every binding key")
    return keys


def handler_name(value: object) -> str:
    """A handler name (its queue's name, the stem of its other names).

    Raises:
        ValueError: not a str, empty, or longer than :data:`MAX_NAME_BYTES`.
        ConfigurationError: it starts with ``amq.``, which RabbitMQ reserves.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("name must be a non-empty str")
    if _utf8_length(value, "name") > MAX_NAME_BYTES:
        raise ValueError(
            f"name must be at most {MAX_NAME_BYTES} bytes in UTF-8 "
            f"(the derived queue and exchange names add suffixes)"
        )
    if value.startswith(RESERVED_PREFIX):
        raise ConfigurationError(
            f"name {value!r} starts with {RESERVED_PREFIX!r}, which RabbitMQ reserves "
            f"for its own queues and exchanges"
        )
    return value


def exchange_name(value: object, what: str = "exchange") -> str:
    """An exchange to publish to: a non-empty str of at most 255 bytes.

    Raises:
        ValueError: it is not.
    """
    return short_string(value, what)


def uuid_string(value: object) -> str:
    """An event id: a str of at most 255 bytes (it is the AMQP ``message_id``).

    Raises:
        TypeError: not a str.
        ValueError: longer than 255 bytes in UTF-8.
    """
    if not isinstance(value, str):
        raise TypeError(f"uuid_string must be a str, not {type(value).__name__}")
    if _utf8_length(value, "uuid_string") > MAX_SHORTSTR_BYTES:
        raise ValueError(f"uuid_string is longer than {MAX_SHORTSTR_BYTES} bytes in UTF-8")
    return value


def timestamp(value: object) -> float | int:
    """A timestamp in Unix seconds: a finite real number.

    Raises:
        TypeError: not an int or float (a bool is refused too).
        ValueError: NaN, infinite, or too large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timestamp must be a number of seconds, not {type(value).__name__}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"timestamp must be a finite number, not {value!r:.40}")
    return value


def json_value(value: object, what: str = "data") -> None:
    """Check that ``value`` is strict JSON (RFC 8259) as Python writes it.

    Raises:
        TypeError: a value of a type JSON has not (a set, bytes, an object),
            a dict key that is not a str, or a reference cycle.
        ValueError: NaN or an infinity, or nesting deeper than
            :data:`MAX_DEPTH`.
    """
    if _is_plain_json(value, 0):
        return
    _check_json(value, what, 0, set())  # the slow walk says what is wrong, and where


def _is_plain_json(value: object, depth: int) -> bool:
    """Fast check without error messages: strict JSON made of exact built-in types.

    False also for what merely needs the careful walk (subclasses such as
    an ``IntEnum``, a reference cycle, deep nesting).
    """
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:
        return True
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if depth >= MAX_DEPTH:
        return False
    # (No typing.cast below: a function call per container on the hot path.)
    if kind is dict:
        mapping: dict[object, object] = value  # type: ignore[assignment]
        return {*map(type, mapping)} <= _STR_ONLY and _plain_items(mapping.values(), depth + 1)
    if kind is list or kind is tuple:
        return _plain_items(value, depth + 1)  # type: ignore[arg-type]
    return False


_STR_ONLY: Final = frozenset({str})


def _plain_items(items: Iterable[object], depth: int) -> bool:
    """Whether every item is plain JSON; scalars are checked in place, without
    a call per item (publishing's hot path)."""
    for item in items:
        kind = type(item)
        if item is None or kind is str or kind is int or kind is bool:
            continue
        if not _is_plain_json(item, depth):
            return False
    return True


def _check_json(value: object, where: str, depth: int, active: set[int]) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}, which JSON cannot represent")
        return
    if not isinstance(value, (dict, list, tuple)):
        raise TypeError(f"{where} is not JSON-serializable: {type(value).__name__}")
    if depth >= MAX_DEPTH:
        raise ValueError(f"{where} is nested deeper than {MAX_DEPTH} levels")
    marker = id(value)
    if marker in active:
        raise TypeError(f"{where} is not JSON-serializable: it contains itself")
    active.add(marker)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} is not strict JSON: a key is a {type(key).__name__}, "
                    f"not a str ({key!r:.40})"
                )
            _check_json(item, f"{where}[{key!r:.40}]", depth + 1, active)
    else:
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", depth + 1, active)
    active.discard(marker)


def headers(value: object) -> dict[str, Any] | None:
    """AMQP headers pika can encode and RabbitMQ accepts, as a new dict.

    Returns:
        A copy of ``value`` (``None`` when empty or ``None``).

    Raises:
        TypeError: not a mapping, a key that is not a str, or a value of a
            type AMQP tables cannot carry (``float`` among them).
        ValueError: a key longer than 255 bytes, an int beyond signed 64
            bits, a Decimal or datetime out of AMQP's range, nesting deeper
            than :data:`MAX_DEPTH`, or more than :data:`MAX_HEADERS_BYTES`.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"headers must be a dict, not {type(value).__name__}")
    table = dict(value)
    if not table:
        return None
    _check_table(table, "headers", 0)
    pieces: list[bytes] = []
    try:
        size = pika.data.encode_table(pieces, table)
    except (pika.exceptions.AMQPError, ValueError, TypeError, OverflowError) as exc:
        # Not expected after the checks above; never let pika's error out.
        raise ValueError(f"headers cannot be encoded as an AMQP table: {exc!r:.200}") from None
    if size > MAX_HEADERS_BYTES:
        raise ValueError(f"headers take {size} bytes encoded; at most {MAX_HEADERS_BYTES}")
    return table


def _check_table(table: Mapping[Any, Any], where: str, depth: int) -> None:
    if not isinstance(table, dict):
        raise TypeError(f"{where} must be a dict, not {type(table).__name__}")
    for key, item in table.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: a header key must be a str, not {type(key).__name__}")
        if _utf8_length(key, f"{where} key {key[:40]!r}") > MAX_SHORTSTR_BYTES:
            raise ValueError(
                f"{where}: key {key[:40]!r}... is longer than {MAX_SHORTSTR_BYTES} bytes in UTF-8"
            )
        _check_field(item, f"{where}[{key[:40]!r}]", depth + 1)


def _check_field(value: object, where: str, depth: int) -> None:
    if value is None or isinstance(value, (bytes, bool)):
        return
    if isinstance(value, str):
        _utf8_length(value, where)
        return
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"{where}: an int header must fit in signed 64 bits")
        return
    if isinstance(value, float):
        raise TypeError(
            f"{where}: AMQP headers cannot carry a float (pika cannot encode it); "
            f"send str(value) or a decimal.Decimal"
        )
    if isinstance(value, decimal.Decimal):
        _check_decimal(value, where)
        return
    if isinstance(value, datetime):
        try:
            seconds = calendar.timegm(value.utctimetuple())
        except (OverflowError, ValueError):
            seconds = -1
        if not 0 <= seconds <= _UINT64_MAX:
            raise ValueError(
                f"{where}: a datetime header must be from 1970 on, within an AMQP timestamp"
            )
        return
    if isinstance(value, (dict, list)):
        if depth >= MAX_DEPTH:
            raise ValueError(f"{where} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            _check_table(value, where, depth)
        else:
            for index, item in enumerate(value):
                _check_field(item, f"{where}[{index}]", depth + 1)
        return
    raise TypeError(
        f"{where}: AMQP headers cannot carry a {type(value).__name__} (use str, bytes, int, "
        f"bool, None, Decimal, datetime, or a dict or list of them)"
    )


def _check_decimal(value: decimal.Decimal, where: str) -> None:
    if not value.is_finite():
        raise ValueError(f"{where}: a Decimal header must be finite")
    try:
        normal = value.normalize()  # what pika sends
        places = max(0, -int(normal.as_tuple().exponent))
        # Look at the size before computing the unscaled value: 1E+999999999
        # would take forever.
        fits = places <= 255 and normal.adjusted() < 10
        if fits:
            raw = int(normal.scaleb(places)) if places else int(normal)
            fits = _INT32_MIN <= raw <= _INT32_MAX
    except decimal.DecimalException:  # e.g. beyond the context's exponent limit
        fits = False
    if not fits:
        raise ValueError(
            f"{where}: an AMQP decimal holds at most 255 decimal places and an unscaled "
            f"value within signed 32 bits; send str(value) instead"
        )


def utf8(text: str, what: str) -> bytes:
    """``text`` encoded as UTF-8.

    Raises:
        ValueError: it holds a lone surrogate.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None


#: The AMQP basic properties that are short strings.
_SHORTSTR_PROPERTIES: Final = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def properties(value: pika.BasicProperties) -> None:
    """Check AMQP properties a user passes in, headers included.

    Raises:
        TypeError: a property or header of the wrong type.
        ValueError: a property or header out of range.
    """
    headers(value.headers)
    for field in _SHORTSTR_PROPERTIES:
        item = getattr(value, field)
        if item is None:
            continue
        if not isinstance(item, str):
            raise TypeError(f"properties.{field} must be a str, not {type(item).__name__}")
        if _utf8_length(item, f"properties.{field}") > MAX_SHORTSTR_BYTES:
            raise ValueError(f"properties.{field} is longer than {MAX_SHORTSTR_BYTES} bytes")
    for field, limit in (("delivery_mode", 2), ("priority", 255), ("timestamp", _UINT64_MAX)):
        item = getattr(value, field)
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"properties.{field} must be an int, not {type(item).__name__}")
        if not (1 if field == "delivery_mode" else 0) <= item <= limit:
            raise ValueError(f"properties.{field} is out of range: {item}")
    try:
        value.encode()
    except (AssertionError, struct.error, pika.exceptions.AMQPError, OverflowError) as exc:
        raise ValueError(f"properties cannot be encoded: {exc!r:.200}") from None
