"""Topic-exchange matching, as RabbitMQ does it: ``*`` is one word, ``#`` any number."""

from __future__ import annotations

import functools

__all__ = ["topic_matches"]


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """Whether a topic exchange routes ``routing_key`` to a binding with ``binding_key``.

    Words are separated by dots; ``*`` matches exactly one word, ``#`` zero
    or more words. Everything else matches itself only.
    """
    return _match(_words(binding_key), _words(routing_key))


def _words(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()


@functools.lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # Zero words, or one word and still inside the '#'.
        return _match(rest, words) or (bool(words) and _match(pattern, words[1:]))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])
