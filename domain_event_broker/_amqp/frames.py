"""Making a copy's headers fit in one AMQP frame.

A message's properties, headers included, travel in one content header
frame, which may be at most the connection's negotiated ``frame_max``
(131,072 bytes by default). A broker closes the connection on a larger one
(``FRAME_ERROR``, frame_too_large). A copy this library publishes (a retry,
a dead letter) carries the original's headers and adds its own (the
exception's message and traceback, ...), so a message that arrived with
headers just under the limit would come out over it, kill the connection,
be delivered again, and loop for ever.

:func:`fit_headers` makes a copy's headers fit, losing as little as it
can, and never silently:

1. a header pika cannot encode (a whole number past 64 bits, which is how
   pika decodes some ``float`` headers of other clients; a table nested past
   Python's recursion limit) is left out;
2. when the whole is too large, the library's own ``x-exception-traceback``
   and then ``x-exception-message`` are shortened (down to a floor);
3. then the largest headers are left out, the original's first, the
   library's own last.

Every header left out is named in :data:`~.._core.headers.DROPPED_HEADERS`
(a table: header key -> its type, size and why it was left out), which is
itself kept within the limit: when naming each one would not fit, one entry
``*`` says how many were left out.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from typing import Any, Final, NamedTuple

import pika
import pika.data
import pika.frame
import pika.spec

from .._core import headers as _headers

__all__ = ["Fitted", "fit_headers", "header_budget"]

#: The shortest a library header is cut to (characters) before headers are
#: left out instead.
_FLOORS: Final = ((_headers.EXCEPTION_TRACEBACK, 400), (_headers.EXCEPTION_MESSAGE, 200))
#: Longest description of a header left out (characters).
MAX_DESCRIPTION_CHARS: Final = 200
#: The key that stands for every header left out when they cannot be named.
SUMMARY_KEY: Final = "*"


class Fitted(NamedTuple):
    """Headers that fit, and what was changed to make them fit."""

    #: The headers to publish (with :data:`~.._core.headers.DROPPED_HEADERS`
    #: when something was left out).
    headers: dict[Any, Any]
    #: Shown key of each header left out -> why (what the record says).
    dropped: dict[str, str]
    #: Keys of the library's headers that were shortened.
    shortened: list[str]


def header_budget(properties: pika.BasicProperties, frame_max: int) -> int:
    """How many bytes the encoded header table of ``properties`` may take
    (its 4-byte length included) for the content header frame to fit in
    ``frame_max``."""
    others = copy.copy(properties)
    others.headers = None
    frame = pika.frame.Header(1, 0, others).marshal()
    return frame_max - len(frame)


def encoded_size(headers: Mapping[Any, Any]) -> int:
    """The size of ``headers`` encoded as an AMQP table (4-byte length included).

    Raises:
        Exception: whatever pika raises for a header it cannot encode.
    """
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, dict(headers))
    return sum(len(piece) for piece in pieces)


def shown_key(key: Any) -> str:
    """``key`` as a table key: text, at most 255 bytes in UTF-8."""
    text = key if isinstance(key, str) else bytes(key).decode("utf-8", "backslashreplace")
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= 255:
        return text
    return encoded[:252].decode("utf-8", "ignore") + "..."


def _describe(value: Any, why: str, size: int | None) -> str:
    """What a header left out was: its type, its size (``size``: of its
    encoded value) or small value, and ``why``."""
    # pika decodes a long integer as its own ``int`` subclass (shown as ``long``)
    kind = "int" if isinstance(value, int) and not isinstance(value, bool) else type(value).__name__
    if isinstance(value, str):
        what = f"{kind} of {len(value.encode('utf-8', 'surrogatepass'))} bytes"
    elif isinstance(value, bytes):
        what = f"{kind} of {len(value)} bytes"
    elif size is not None:
        what = f"{kind} of {size} bytes encoded"
    elif isinstance(value, (int, float)):
        shown = str(int(value)) if kind == "int" else repr(value)
        what = f"{kind} {shown if len(shown) <= 60 else shown[:57] + '...'}"
    else:
        what = kind
    text = f"{what}: {why}"
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[: MAX_DESCRIPTION_CHARS - 3] + "..."
    return text


def _entry_size(key: Any, value: Any) -> int:
    return encoded_size({key: value}) - 4


def _value_size(key: Any, entry_size: int) -> int:
    encoded = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return entry_size - 1 - len(encoded)


def fit_headers(
    headers: Mapping[Any, Any],
    budget: int,
    *,
    added: Collection[Any] = (),
) -> Fitted:
    """``headers`` made to encode, in at most ``budget`` bytes.

    Args:
        headers: the copy's headers (the original's and the library's).
        budget: the most bytes the encoded table may take (see
            :func:`header_budget`).
        added: keys of the headers the library added to the copy: shortened
            first, and left out last.

    Returns:
        The headers to publish, and what was left out or shortened (see the
        module's docs). When ``budget`` is too small even for a record of
        what was left out (under 4 bytes, or a few dozen), the headers are
        empty and ``dropped`` still names every header, for the log.
    """
    kept: dict[Any, Any] = {}
    sizes: dict[Any, int] = {}
    dropped: dict[str, str] = {}
    prior: dict[str, Any] = {}
    for key, value in headers.items():
        if key == _headers.DROPPED_HEADERS:
            # An earlier copy's record is added to; anything else by that
            # name gives way to the record, and is named in it.
            try:
                encoded_size(value if isinstance(value, dict) else {"": value})
            except Exception as exc:  # noqa: BLE001  # RecursionError too
                why = f"pika cannot encode it ({type(exc).__name__}: {exc})"
                dropped[key] = _describe(value, why, None)
                continue
            if isinstance(value, dict):
                prior = {shown_key(k): v for k, v in value.items()}
            else:
                dropped[key] = _describe(value, "not a table: the record of left-out headers", None)
            continue
        try:
            size = _entry_size(key, value)
        except Exception as exc:  # noqa: BLE001  # RecursionError too
            why = f"pika cannot encode it ({type(exc).__name__}: {exc})"
            dropped[shown_key(key)] = _describe(value, why, None)
            continue
        kept[key] = value
        sizes[key] = size

    def record() -> dict[str, Any]:
        return {**prior, **dropped}

    def total(recorded: Mapping[str, Any] | None = None) -> int:
        recorded = record() if recorded is None else recorded
        extra = _entry_size(_headers.DROPPED_HEADERS, dict(recorded)) if recorded else 0
        return 4 + sum(sizes.values()) + extra

    shortened: list[str] = []
    for key, floor in _FLOORS:
        excess = total() - budget
        if excess <= 0:
            break
        value = kept.get(key)
        if key not in added or not isinstance(value, str) or len(value) <= floor:
            continue
        # Each character is at least one byte: cutting ``excess`` characters
        # (and room for the marker) frees at least ``excess`` bytes.
        length = max(floor, len(value) - excess - 32)
        kept[key] = _cut(key, value, length)
        sizes[key] = _entry_size(key, kept[key])
        shortened.append(key)

    why = f"too large for the copy's header frame ({budget} bytes for all headers)"

    def drop(key: Any) -> None:
        size = _value_size(key, sizes.pop(key))
        dropped[shown_key(key)] = _describe(kept.pop(key), why, size)

    order = sorted(
        (key for key in kept if key not in added), key=lambda k: sizes[k], reverse=True
    ) + sorted((key for key in kept if key in added), key=lambda k: sizes[k], reverse=True)
    for key in order:
        if total() <= budget:
            break
        drop(key)

    if total() > budget and (prior or dropped):
        # Named one by one they do not fit: one line for them all.
        count = len(prior) + len(dropped)
        summary = {SUMMARY_KEY: f"{count} header(s) left out; too many to name them here"}
        while kept and total(summary) > budget:
            key = max(kept, key=lambda k: sizes[k])
            drop(key)
            count += 1
            summary = {SUMMARY_KEY: f"{count} header(s) left out; too many to name them here"}
        if total(summary) > budget:
            return Fitted({}, dropped, shortened)
        result = dict(kept)
        result[_headers.DROPPED_HEADERS] = summary
        return Fitted(result, dropped, shortened)
    if total() > budget:
        return Fitted({}, dropped, shortened)
    result = dict(kept)
    if prior or dropped:
        result[_headers.DROPPED_HEADERS] = record()
    return Fitted(result, dropped, shortened)


def _cut(key: str, value: str, length: int) -> str:
    """``value`` cut to ``length`` characters: a traceback keeps its end (the
    most recent frames), a message its start."""
    if key == _headers.EXCEPTION_TRACEBACK:
        return _headers.truncate(value, length)
    return value[: length - 15] + "...[truncated]"
