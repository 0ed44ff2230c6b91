"""AMQP headers this library owns, and helpers to copy message properties."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import pika

#: How many times the handler already asked to retry this event.
RETRY_COUNT: Final = "x-retry-count"
#: Written on every dead letter.
EXCEPTION_TYPE: Final = "x-exception-type"
EXCEPTION_MESSAGE: Final = "x-exception-message"
EXCEPTION_TRACEBACK: Final = "x-exception-traceback"
FAILED_HANDLER: Final = "x-failed-handler"
FAILED_AT: Final = "x-failed-at"
#: The event's own routing key, on a dead letter moved to the tail of its
#: ``-dl`` queue by a replay run (the default exchange routes by queue name).
ORIGINAL_ROUTING_KEY: Final = "x-original-routing-key"
#: On every copy this library makes of a message (retry, dead letter, replay,
#: import): the ``expiration`` property the message had. The copy has none,
#: as RabbitMQ's own dead-lettering does: a dead letter must not expire out
#: of its queue, nor a retry come back at the message's expiration rather
#: than after its delay.
ORIGINAL_EXPIRATION: Final = "x-original-expiration"
#: Stands for the headers pika's decoder rejected on a delivery (a table:
#: header key -> what its value was and why it could not be decoded).
UNDECODABLE_HEADERS: Final = "x-undecodable-headers"
#: On a copy this library makes (retry, dead letter): the headers it had to
#: leave out, a table: header key -> its type, size and why (pika cannot
#: encode it, or the copy would not fit in the connection's ``frame_max``).
DROPPED_HEADERS: Final = "x-dropped-headers"

#: Longest traceback (characters) kept in a dead letter's headers.
MAX_TRACEBACK_CHARS: Final = 8_000
#: Longest exception message (characters) kept in a dead letter's headers.
MAX_MESSAGE_CHARS: Final = 1_000

#: Headers RabbitMQ adds when it dead-letters; dropped when republishing
#: (before 4.0.1 RabbitMQ may drop messages it sees cycling with them).
_DEATH_HEADERS: Final = ("x-death", "x-first-death-", "x-last-death-")


def without_death_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` without RabbitMQ's dead-lettering bookkeeping.

    A key that is not UTF-8 (pika hands it on as ``bytes``) is kept.
    """
    if not headers:
        return {}
    return {
        key: value
        for key, value in headers.items()
        if not isinstance(key, str) or (key != "x-death" and not key.startswith(_DEATH_HEADERS[1:]))
    }


def retry_count(headers: Mapping[str, Any] | None) -> int:
    """The library's retry count from ``headers`` (0 when absent or invalid)."""
    if not headers:
        return 0
    value = headers.get(RETRY_COUNT, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def copy_properties(
    properties: pika.BasicProperties | None,
    headers: dict[str, Any],
    *,
    keep_expiration: bool = False,
) -> pika.BasicProperties:
    """A copy of ``properties`` (every field kept) with ``headers`` instead.

    A message that had no properties at all becomes persistent. Its
    ``expiration`` is left out of the copy and kept in
    :data:`ORIGINAL_EXPIRATION` (added to ``headers``), unless
    ``keep_expiration`` (a view of a message, not a copy to publish).
    """
    if properties is None:
        return pika.BasicProperties(delivery_mode=2, headers=headers or None)
    expiration = properties.expiration
    if expiration is not None and not keep_expiration:
        headers = {**headers, ORIGINAL_EXPIRATION: expiration}
        expiration = None
    return pika.BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=headers or None,
        delivery_mode=properties.delivery_mode,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        expiration=expiration,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.type,
        user_id=properties.user_id,
        app_id=properties.app_id,
        cluster_id=properties.cluster_id,
    )


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, keeping the end (the most recent frames)."""
    if len(text) <= limit:
        return text
    return "...[truncated]\n" + text[-(limit - 15) :]
