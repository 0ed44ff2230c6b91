"""Connection settings: the "unset" sentinel, defaults, URL checks, redaction.

Resolution order for a broker URL, first match wins:

1. the ``connection_settings`` argument (``None`` disables the broker);
2. the ``DOMAIN_EVENT_BROKER`` environment variable;
3. the value given to :func:`configure` (the Django app passes its setting);
4. :data:`DEFAULT_URL`.
"""

from __future__ import annotations

import functools
import os
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import pika

from . import _names
from .errors import ConfigurationError

__all__ = ["UNSET", "configure", "reset_defaults"]

DEFAULT_URL: Final = "amqp://guest:guest@localhost:5672/%2F"
ENVIRONMENT_VARIABLE: Final = "DOMAIN_EVENT_BROKER"
#: Environment variable naming the queue type of handlers registered without one.
QUEUE_TYPE_VARIABLE: Final = "DOMAIN_EVENT_BROKER_QUEUE_TYPE"

#: Default deadline (seconds) for connecting, and for one publish including
#: its reconnection attempts.
DEFAULT_TIMEOUT: Final = 30.0

#: Per-attempt limits, further capped by what is left of the deadline.
SOCKET_TIMEOUT: Final = 10.0
STACK_TIMEOUT: Final = 15.0

#: AMQP heartbeat (seconds) asked for unless the URL sets one: a dead peer is
#: noticed even while waiting for a confirm, also when the broker proposes 0.
HEARTBEAT: Final = 60


class _Unset:
    """Type of :data:`UNSET`: "use the configured default"."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: Sentinel for "not given: use the configured default". Distinct from
#: ``None``, which means "no broker at all".
UNSET: Final = _Unset()

#: What ``connection_settings`` accepts: a URL, several URLs of one
#: cluster, ``None`` (no broker), or :data:`UNSET` (the default).
ConnectionSettings = str | Sequence[str] | _Unset | None


@dataclass
class _Defaults:
    broker: str | Sequence[str] | _Unset | None = UNSET
    timeout: float = DEFAULT_TIMEOUT
    queue_type: str | None = None


_defaults = _Defaults()
_defaults_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # A thread of the parent may have held the lock at fork time.
    global _defaults_lock  # noqa: PLW0603  # rebinding the module's lock is the point
    _defaults_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def configure(
    *,
    broker: str | Sequence[str] | _Unset | None = UNSET,
    timeout: float | _Unset = UNSET,
    queue_type: str | _Unset | None = UNSET,
) -> None:
    """Set process-wide defaults used when an argument is left out.

    Args:
        broker: default AMQP URL, or list of URLs of one cluster, or ``None``
            to disable publishing; ``''`` restores the built-in default. The
            ``DOMAIN_EVENT_BROKER`` environment variable still takes
            precedence, so operators can override it.
        timeout: seconds a connect or a publish may take, reconnection
            attempts included, before a :class:`BrokerError` is raised.
        queue_type: queue type of handlers registered without one:
            ``"classic"``, ``"quorum"``, or ``None`` (the broker's default).
            The ``DOMAIN_EVENT_BROKER_QUEUE_TYPE`` environment variable takes
            precedence (added in 4.1).

    Raises:
        ConfigurationError: a URL is malformed, the timeout not positive or
            the queue type unknown.

    .. versionadded:: 4.0
    """
    with _defaults_lock:
        if isinstance(broker, str) and not broker.strip():
            # '' meant "the default broker" in 3.0.2 (e.g. an empty Django setting).
            _defaults.broker = UNSET
        elif not isinstance(broker, _Unset):
            if broker is not None:
                _parse_urls(_as_tuple(broker))
            _defaults.broker = broker
        if not isinstance(timeout, _Unset):
            _defaults.timeout = check_timeout(timeout)
        if not isinstance(queue_type, _Unset):
            _defaults.queue_type = check_queue_type(queue_type, "queue_type")


def reset_defaults() -> None:
    """Undo every :func:`configure` call.

    .. versionadded:: 4.0
    """
    with _defaults_lock:
        _defaults.broker = UNSET
        _defaults.timeout = DEFAULT_TIMEOUT
        _defaults.queue_type = None


def check_queue_type(queue_type: object, source: str) -> str | None:
    """``queue_type`` if it is ``None``, ``"classic"`` or ``"quorum"`` (``""``: ``None``).

    Raises:
        ConfigurationError: any other value; ``source`` says where it came from.
    """
    if queue_type is None or queue_type == "":
        return None
    if isinstance(queue_type, str) and queue_type in _names.QUEUE_TYPES:
        return queue_type
    raise ConfigurationError(
        f"{source} must be 'classic', 'quorum' or empty (the broker's default), not {queue_type!r}"
    )


def default_queue_type() -> str | None:
    """Queue type for handlers registered without one: the
    ``DOMAIN_EVENT_BROKER_QUEUE_TYPE`` environment variable, else
    :func:`configure`'s, else ``None`` (the broker's default).

    Raises:
        ConfigurationError: the environment variable names no queue type.
    """
    value = os.environ.get(QUEUE_TYPE_VARIABLE, "").strip()
    if value:
        return check_queue_type(value, f"the {QUEUE_TYPE_VARIABLE} environment variable")
    return _defaults.queue_type


def check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def default_timeout(timeout: float | _Unset = UNSET) -> float:
    if isinstance(timeout, _Unset):
        return _defaults.timeout
    return check_timeout(timeout)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``.

    Works on malformed URLs too (e.g. a password holding an unescaped ``/``,
    ``?`` or ``#``), so that error messages about them stay free of secrets.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostpart}"


def _scrub(text: str, url: str) -> str:
    """``text`` with ``url``'s password (if any) removed."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    secret = userinfo.partition(":")[2]
    return text.replace(secret, "***") if secret else text


@dataclass(frozen=True)
class BrokerConfig:
    """The resolved, validated URLs of one broker (or one cluster's nodes)."""

    urls: tuple[str, ...]
    timeout: float

    def __repr__(self) -> str:
        return f"BrokerConfig(urls={self.display!r}, timeout={self.timeout!r})"

    @property
    def display(self) -> str:
        """The URLs without passwords, for logs and error messages."""
        return ", ".join(redact(url) for url in self.urls)

    @property
    def heartbeat(self) -> float | None:
        """The shortest AMQP heartbeat asked for (seconds), ``None`` when off.

        A URL's ``heartbeat`` option wins over :data:`HEARTBEAT`.
        """
        asked = [
            pika.URLParameters(url).heartbeat if "heartbeat" in explicit else HEARTBEAT
            for url, explicit in _parse_urls(self.urls)
        ]
        enabled = [seconds for seconds in asked if isinstance(seconds, int) and seconds > 0]
        return float(min(enabled)) if enabled else None

    def parameters(self, connection_name: str, time_left: float) -> list[pika.URLParameters]:
        """Fresh pika parameters for each URL, limited by ``time_left``."""
        result = []
        for url, explicit in _parse_urls(self.urls):
            params = pika.URLParameters(url)
            if "socket_timeout" not in explicit:
                params.socket_timeout = max(0.1, min(SOCKET_TIMEOUT, time_left))
            if "stack_timeout" not in explicit:
                params.stack_timeout = max(0.1, min(STACK_TIMEOUT, time_left))
            if "blocked_connection_timeout" not in explicit:
                params.blocked_connection_timeout = self.timeout
            if "heartbeat" not in explicit:
                params.heartbeat = HEARTBEAT
            params.connection_attempts = 1
            params.client_properties = {"connection_name": connection_name}
            result.append(params)
        return result


def _as_tuple(settings: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(settings, str):
        urls = tuple(part for part in settings.replace(",", " ").split() if part)
    elif isinstance(settings, Sequence):
        urls = tuple(settings)
    else:
        raise ConfigurationError(
            f"connection_settings must be an AMQP URL, a list of URLs or None, "
            f"not {type(settings).__name__}"
        )
    if not urls:
        raise ConfigurationError("connection_settings holds no AMQP URL")
    for url in urls:
        if not isinstance(url, str):
            raise ConfigurationError(f"an AMQP URL must be a str, not {type(url).__name__}")
    return urls


@functools.lru_cache(maxsize=64)
def _parse_urls(urls: tuple[str, ...]) -> tuple[tuple[str, frozenset[str]], ...]:
    """Validate each URL; return it with the query options it sets itself."""
    parsed = []
    for url in urls:
        shown = redact(url)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: {_scrub(str(exc), url)}"
            ) from None
        if "@" in url and "@" not in parts.netloc:
            # e.g. "amqp://user:pa/ss@host": urllib would read "pa" as the port.
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: a '/', '?', '#' or '@' in the user "
                f"name or password must be percent-encoded"
            )
        try:
            parts.port  # noqa: B018  # raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: {_scrub(str(exc), url)}"
            ) from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: the scheme must be amqp:// or amqps://"
            )
        if parts.netloc and not parts.hostname:
            raise ConfigurationError(f"malformed AMQP URL {shown!r}: no host name")
        try:
            pika.URLParameters(url)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: {_scrub(str(exc), url)}"
            ) from None
        explicit = frozenset(urllib.parse.parse_qs(parts.query))
        parsed.append((url, explicit))
    return tuple(parsed)


def resolve(
    connection_settings: ConnectionSettings = UNSET,
    timeout: float | _Unset = UNSET,
) -> BrokerConfig | None:
    """Resolve ``connection_settings`` to a :class:`BrokerConfig`, or ``None``
    when the broker is disabled.

    Raises:
        ConfigurationError: a URL is malformed.
    """
    seconds = default_timeout(timeout)
    settings: str | Sequence[str] | _Unset | None = connection_settings
    if isinstance(settings, str) and not settings.strip():
        # 3.0.2 used '' to mean "the default broker".
        settings = UNSET
    if isinstance(settings, _Unset):
        settings = os.environ.get(ENVIRONMENT_VARIABLE, "").strip() or _defaults.broker
    if isinstance(settings, _Unset):
        settings = DEFAULT_URL
    if settings is None:
        return None
    urls = _as_tuple(settings)
    _parse_urls(urls)
    return BrokerConfig(urls=urls, timeout=seconds)
