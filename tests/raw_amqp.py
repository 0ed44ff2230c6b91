"""Encoding AMQP properties byte by byte, for messages pika's own encoder
would refuse or could not produce (and its decoder cannot read back):
timestamps past Python's ``datetime``, floats pika cannot turn into an
``int``, tables nested deeper than Python's recursion limit, short strings
that are not UTF-8, field types pika does not know.

:class:`RawProperties` is handed to pika's ``basic_publish`` like any
``BasicProperties``: pika calls its ``encode()`` to write the content
header frame, and that returns the bytes given here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import ClassVar

import pika
import pika.spec

__all__ = [
    "RawProperties",
    "array",
    "field",
    "shortstr",
    "table",
    "timestamp",
]


def shortstr(value: bytes) -> bytes:
    """An AMQP short string: one length byte, then ``value`` (any bytes)."""
    if len(value) > 255:
        raise ValueError("a short string holds at most 255 bytes")
    return struct.pack("B", len(value)) + value


def field(tag: bytes, payload: bytes = b"") -> bytes:
    """A field value: its one-byte type tag, then its payload as given."""
    return tag + payload


def timestamp(seconds: int) -> bytes:
    """A timestamp field (unsigned 64-bit seconds)."""
    return field(b"T", struct.pack(">Q", seconds))


def table(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A field table's bytes (size first) from (key, encoded field value) pairs."""
    content = b"".join(shortstr(key) + value for key, value in entries)
    return struct.pack(">I", len(content)) + content


def array(values: Iterable[bytes]) -> bytes:
    """A field array's bytes (size first) from encoded field values."""
    content = b"".join(values)
    return struct.pack(">I", len(content)) + content


class RawProperties(pika.BasicProperties):  # type: ignore[misc]  # pika is untyped
    """Properties whose header table and short strings are raw bytes.

    Args:
        headers_table: the encoded table (as :func:`table` makes it), or ``None``.
        shortstrs: raw bytes for short-string properties by name
            (``content_type``, ``message_id``, ``type``, ...).
        delivery_mode: as pika's.
    """

    _SHORTSTR_FLAGS: ClassVar[dict[str, int]] = {
        "content_type": pika.spec.BasicProperties.FLAG_CONTENT_TYPE,
        "content_encoding": pika.spec.BasicProperties.FLAG_CONTENT_ENCODING,
        "correlation_id": pika.spec.BasicProperties.FLAG_CORRELATION_ID,
        "reply_to": pika.spec.BasicProperties.FLAG_REPLY_TO,
        "expiration": pika.spec.BasicProperties.FLAG_EXPIRATION,
        "message_id": pika.spec.BasicProperties.FLAG_MESSAGE_ID,
        "type": pika.spec.BasicProperties.FLAG_TYPE,
        "user_id": pika.spec.BasicProperties.FLAG_USER_ID,
        "app_id": pika.spec.BasicProperties.FLAG_APP_ID,
        "cluster_id": pika.spec.BasicProperties.FLAG_CLUSTER_ID,
    }
    #: The order of the properties on the wire (AMQP 0-9-1, class basic).
    _ORDER: ClassVar[tuple[str, ...]] = (
        "content_type",
        "content_encoding",
        "headers",
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

    def __init__(
        self,
        headers_table: bytes | None = None,
        shortstrs: dict[str, bytes] | None = None,
        delivery_mode: int = 2,
    ) -> None:
        super().__init__(delivery_mode=delivery_mode)
        self.raw_headers = headers_table
        self.raw_shortstrs = dict(shortstrs or {})
        unknown = set(self.raw_shortstrs) - set(self._SHORTSTR_FLAGS)
        if unknown:
            raise ValueError(f"not short-string properties: {sorted(unknown)}")

    def encode(self) -> list[bytes]:
        spec = pika.spec.BasicProperties
        flags = 0
        pieces: list[bytes] = []
        for name in self._ORDER:
            if name in self.raw_shortstrs:
                flags |= self._SHORTSTR_FLAGS[name]
                pieces.append(shortstr(self.raw_shortstrs[name]))
            elif name == "headers" and self.raw_headers is not None:
                flags |= spec.FLAG_HEADERS
                pieces.append(self.raw_headers)
            elif name == "delivery_mode" and self.delivery_mode is not None:
                flags |= spec.FLAG_DELIVERY_MODE
                pieces.append(struct.pack("B", self.delivery_mode))
        return [struct.pack(">H", flags), *pieces]
