"""Connection settings: the "unset" sentinel, defaults, URL checks, redaction.

Resolution order for a broker URL, first match wins:

1. the ``connection_settings`` argument (``None`` disables the broker);
2. the ``DOMAIN_EVENT_BROKER`` environment variable, or the file named by
   ``DOMAIN_EVENT_BROKER_FILE`` (a mounted secret; setting both is an error);
3. the value given to :func:`configure` (the Django app passes its setting);
4. :data:`DEFAULT_URL`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import ssl
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import pika

from ..errors import ConfigurationError
from . import names as _names
from . import tls as _tls

__all__ = ["UNSET", "configure", "reset_defaults"]

log = logging.getLogger(__name__)

DEFAULT_URL: Final = "amqp://guest:guest@localhost:5672/%2F"
ENVIRONMENT_VARIABLE: Final = "DOMAIN_EVENT_BROKER"
#: Names a file holding the URL(s), e.g. a secret mounted by the container platform.
FILE_ENVIRONMENT_VARIABLE: Final = "DOMAIN_EVENT_BROKER_FILE"
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

#: Default cap on the connections :func:`publish_domain_event` opens per
#: process and broker (one per thread publishing at the same moment).
DEFAULT_MAX_CONNECTIONS: Final = 16


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
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    ssl_context: ssl.SSLContext | None = None
    require_route: bool = False
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
    max_connections: int | _Unset = UNSET,
    ssl_context: ssl.SSLContext | _Unset | None = UNSET,
    require_route: bool | _Unset = UNSET,
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
        max_connections: the most connections :func:`publish_domain_event`
            opens per process and broker (default 16): one per thread
            publishing at the same moment; further threads wait for one to
            be free. Applies to connections opened from then on.
        require_route: whether publishing raises
            :class:`~domain_event_broker.UnroutableError` when no queue is
            bound for an event's routing key (default ``False``: the broker
            discards such an event, as in 3.0.2).
        ssl_context: the :class:`ssl.SSLContext` for ``amqps://`` URLs, in
            place of the one built from their ``cacertfile``, ``certfile``,
            ``keyfile`` and ``verify`` options; ``None`` goes back to those.

        queue_type: queue type of handlers registered without one:
            ``"classic"``, ``"quorum"``, or ``None`` (the broker's default).
            The ``DOMAIN_EVENT_BROKER_QUEUE_TYPE`` environment variable takes
            precedence (added in 4.1).

    Raises:
        ConfigurationError: a URL is malformed, a TLS file cannot be used,
            the timeout not positive, ``require_route`` not a bool,
            ``max_connections`` not a positive int, or the queue type unknown.
        TypeError: ``ssl_context`` is not an :class:`ssl.SSLContext`.

    .. versionadded:: 4.0
    .. versionchanged:: 4.1
       The ``require_route``, ``ssl_context`` and ``max_connections`` arguments.
    """
    if not isinstance(require_route, (bool, _Unset)):
        raise ConfigurationError(
            f"require_route must be True or False, not {type(require_route).__name__}"
        )
    if not isinstance(max_connections, _Unset) and (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or max_connections < 1
    ):
        raise ConfigurationError(f"max_connections must be a positive int, not {max_connections!r}")
    if not isinstance(ssl_context, _Unset):
        _check_ssl_context(ssl_context)
        if ssl_context is not None:
            _tls.warn_if_unverified(ssl_context, "configure()")
    with _defaults_lock:
        if isinstance(broker, str) and not broker.strip():
            # '' meant "the default broker" in 3.0.2 (e.g. an empty Django setting).
            _defaults.broker = UNSET
        elif not isinstance(broker, _Unset):
            if broker is not None:
                _parse_urls(_as_tuple(broker))
                context = _defaults.ssl_context if isinstance(ssl_context, _Unset) else ssl_context
                _check_tls(_as_tuple(broker), context is not None)  # e.g. a missing CA file
            _defaults.broker = broker
        if not isinstance(timeout, _Unset):
            _defaults.timeout = check_timeout(timeout)
        if not isinstance(max_connections, _Unset):
            _defaults.max_connections = max_connections
        if not isinstance(ssl_context, _Unset):
            _defaults.ssl_context = ssl_context
        if not isinstance(require_route, _Unset):
            _defaults.require_route = require_route
        if not isinstance(queue_type, _Unset):
            _defaults.queue_type = check_queue_type(queue_type, "queue_type")


def default_require_route(require_route: object = UNSET) -> bool:
    """``require_route``, or the configured default when it is :data:`UNSET`.

    Raises:
        TypeError: it is neither a bool nor :data:`UNSET`.
    """
    if isinstance(require_route, _Unset):
        return _defaults.require_route
    if not isinstance(require_route, bool):
        raise TypeError(f"require_route must be True or False, not {type(require_route).__name__}")
    return require_route


def reset_defaults() -> None:
    """Undo every :func:`configure` call.

    .. versionadded:: 4.0
    """
    with _defaults_lock:
        _defaults.broker = UNSET
        _defaults.timeout = DEFAULT_TIMEOUT
        _defaults.max_connections = DEFAULT_MAX_CONNECTIONS
        _defaults.require_route = False
        _defaults.ssl_context = None
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
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigurationError(
            f"timeout must be a positive number of seconds, not {type(timeout).__name__}"
        )
    try:
        seconds = float(timeout)
    except OverflowError:
        seconds = math.inf
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigurationError(
            f"timeout must be a positive, finite number of seconds, not {timeout!r:.40}"
        )
    return seconds


def max_connections() -> int:
    """The configured cap on :func:`publish_domain_event`'s connections."""
    return _defaults.max_connections


def default_timeout(timeout: float | _Unset = UNSET) -> float:
    if isinstance(timeout, _Unset):
        return _defaults.timeout
    return check_timeout(timeout)


#: A scheme-like start of a string that lacks "://" (e.g. "amqp:" or "amqp//").
_SCHEME_LIKE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(?::/{0,2}|/{1,2})")
#: What a URL scheme may look like (RFC 3986).
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _split_scheme(url: str) -> tuple[str, str]:
    """``(scheme, rest)`` when ``url`` starts with ``scheme://``, else ``("", url)``.

    A "://" after something that cannot be a scheme (e.g. inside a password,
    as in ``user:pa://ss@host``) does not count.
    """
    scheme, separator, rest = url.partition("://")
    if separator and _SCHEME.fullmatch(scheme):
        return scheme, rest
    return "", url


def redact(url: str) -> str:
    """``url`` without anything that may be a password, for messages and logs.

    Does not rely on ``url`` being well formed: everything before the last
    ``@`` is hidden, except the scheme and a user name in a well-formed
    ``scheme://user:password@`` prefix; a port that is not a number (it may
    be a password whose host was forgotten) is hidden too, and so is the
    value of pika's ``ssl_options`` query parameter.
    """
    url = _tls.redact_query(url)
    scheme, rest = _split_scheme(url)
    separator = "://" if scheme else ""
    if separator:
        prefix = scheme + separator
    else:
        match = _SCHEME_LIKE.match(url)
        prefix = match.group() if match and "@" in url[match.end() :] else ""
        rest = url[len(prefix) :]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return prefix + _redact_port(rest)
    user, colon, _ = userinfo.partition(":")
    if separator and not any(char in user for char in "/?#"):
        shown = f"{user}:***@" if colon else f"{user}@"
    else:
        shown = "***@"
    return prefix + shown + _redact_port(hostpart)


def _redact_port(hostpart: str) -> str:
    """``hostpart`` (``host:port/path...``) with a port that is not a number hidden."""
    end = min((i for i in (hostpart.find(c) for c in "/?#") if i >= 0), default=len(hostpart))
    netloc, tail = hostpart[:end], hostpart[end:]
    colon = netloc.rfind(":")
    if colon > netloc.rfind("]") and not netloc[colon + 1 :].isdigit() and netloc[colon + 1 :]:
        netloc = netloc[: colon + 1] + "***"
    return netloc + tail


def _secrets(url: str) -> list[str]:
    """Every substring of ``url`` that may be (part of) a password, longest first."""
    rest = _split_scheme(url)[1]
    userinfo = rest.rpartition("@")[0]
    candidates = {userinfo, userinfo.partition(":")[2]}
    netloc = re.split(r"[/?#]", rest.rpartition("@")[2] if userinfo else rest, maxsplit=1)[0]
    port = netloc.rpartition(":")[2]
    if not port.isdigit():
        candidates.add(port)
    candidates |= {urllib.parse.unquote(candidate) for candidate in candidates}
    return sorted((c for c in candidates if c), key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """``text`` with anything of ``url`` that may be a password removed."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _shape_problem(url: str) -> str | None:
    """What is wrong with the start of ``url``, in words; ``None`` if nothing."""
    example = "amqp://user:password@host:5672/%2F"
    scheme = _split_scheme(url)[0]
    lowered = url.lower()
    if not scheme:
        for name in ("amqps", "amqp"):
            if lowered.startswith(f"{name}:/"):
                return f"write two slashes after '{name}:' (e.g. {example})"
            if lowered.startswith(f"{name}:"):
                return f"'//' is missing after '{name}:' (e.g. {example})"
            if lowered.startswith(f"{name}/"):
                return f"':' is missing between '{name}' and '//' (e.g. {example})"
        return f"it must start with amqp:// or amqps:// (e.g. {example})"
    if scheme.lower() not in ("amqp", "amqps"):
        return f"the scheme must be amqp:// or amqps://, not {scheme[:20]!r}"
    return None


@dataclass(frozen=True)
class BrokerConfig:
    """The resolved, validated URLs of one broker (or one cluster's nodes)."""

    urls: tuple[str, ...]
    timeout: float
    #: The caller's context for ``amqps://`` URLs; ``None``: built from the URL.
    ssl_context: ssl.SSLContext | None = None
    #: Whether the URLs came from the configured source (the environment,
    #: the broker file, :func:`configure`), not from the caller: then a new
    #: connection reads them again (:func:`current`), so that a rotated
    #: password reaches long-lived connections too.
    reread: bool = field(default=False, compare=False)

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
            _pika_parameters(url).heartbeat if "heartbeat" in explicit else HEARTBEAT
            for url, explicit in _parse_urls(self.urls)
        ]
        enabled = [seconds for seconds in asked if isinstance(seconds, int) and seconds > 0]
        return float(min(enabled)) if enabled else None

    def parameters(self, connection_name: str, time_left: float) -> list[pika.URLParameters]:
        """Fresh pika parameters for each URL, limited by ``time_left``."""
        result = []
        for url, explicit in _parse_urls(self.urls):
            params = _tls.parameters(url, redact(url), self.ssl_context)
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


#: Where one string of several URLs is cut: at white space, and at a comma
#: followed by the next URL's scheme and a slash (``,amqp://``, or a
#: mistyped ``,amqp:/`` or ``,amqp/``). A user name or password cannot hold
#: that unencoded (a ``/`` there must be ``%2F``), so a comma in a password
#: (legal in a URL) is kept.
_URL_SEPARATOR: Final = re.compile(r"\s+|,(?=\s*(?:[A-Za-z][A-Za-z0-9+.-]*:/|(?i:amqps?)/))")


def split_urls(text: str) -> tuple[str, ...]:
    """The URLs in one string of URLs separated by commas or white space.

    A comma counts as a separator only before the next URL's scheme, so
    ``amqp://u:pa,ss@host`` is one URL (pika reads the password ``pa,ss``);
    commas at either end of a URL are dropped.

    .. versionadded:: 4.2
    """
    return tuple(url for part in _URL_SEPARATOR.split(text) if (url := part.strip(",")))


def _as_tuple(settings: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(settings, str):
        urls = split_urls(settings)
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
        problem = _shape_problem(url)
        if problem is not None:
            raise ConfigurationError(f"malformed AMQP URL {shown!r}: {problem}")
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as exc:  # e.g. an unmatched '[' (an IPv6 host)
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: the user name, password, host or port: "
                f"{_scrub(str(exc), url)}"
            ) from None
        problem = _netloc_problem(url, parts)
        if problem is not None:
            raise ConfigurationError(f"malformed AMQP URL {shown!r}: {problem}")
        _tls.split_url(url, shown)  # its own ConfigurationError, not wrapped below
        try:
            _tls.parameters(url, shown, None, tls=False)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"malformed AMQP URL {shown!r}: {_scrub(str(exc), url)}"
            ) from None
        explicit = frozenset(urllib.parse.parse_qs(parts.query))
        parsed.append((url, explicit))
    return tuple(parsed)


#: Said when a URL holds a comma where none can be: the URLs of a cluster
#: must each start with their scheme.
_SEVERAL_NODES: Final = (
    "to give several nodes, separate whole URLs with commas or spaces "
    "(amqp://u:p@rabbit-1/%2F,amqp://u:p@rabbit-2/%2F)"
)


def _netloc_problem(url: str, parts: urllib.parse.SplitResult) -> str | None:  # noqa: PLR0911  # one return per problem
    """What is wrong with the user, password, host or port of ``url``, in
    words that name the part; ``None`` if nothing."""
    rest = url.partition("://")[2]
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if "@" in rest and rest.rpartition("@")[0] != userinfo:
        # e.g. "amqp://user:pa/ss@host": urllib would read "pa" as the port;
        # "amqp://u:p@ss/w@host": the host would be "ss".
        return (
            "a '/', '?', '#' or '@' in the user name, password or virtual host "
            "must be percent-encoded (e.g. '@' as %40)"
        )
    if "@" in userinfo:
        # "amqp://app:pa@ss@rabbit": pika would take the password "pa@ss",
        # but it may as well be a host or a forgotten separator.
        hint = f"; {_SEVERAL_NODES}" if "," in userinfo else ""
        return f"an '@' in the user name or password must be percent-encoded as %40{hint}"
    if at and ":" not in userinfo:
        # pika fails on it (TypeError); RabbitMQ's URI spec leaves it to the client.
        what = f"the user name {urllib.parse.unquote(userinfo)!r}" if userinfo else "the '@'"
        return (
            f"{what} has no password: write user:password@host "
            f"(user:@host for an empty password), or leave out user and '@' "
            f"for the default user"
        )
    if "," in hostport:
        return f"a ',' in the host name or port; {_SEVERAL_NODES}"
    try:
        parts.port  # noqa: B018  # raises ValueError on a bad port
    except ValueError:
        return "the port must be a number from 0 to 65535"
    if parts.netloc and not parts.hostname:
        return "no host name"
    host = parts.hostname or ""
    if not host.startswith("[") and ":" not in host:  # not an IPv6 address
        try:
            host.encode("idna")  # as socket.getaddrinfo() will, when connecting
        except UnicodeError as exc:
            return f"the host name is not a valid DNS name ({exc})"
    return None


def resolve(
    connection_settings: ConnectionSettings = UNSET,
    timeout: float | _Unset = UNSET,
    ssl_context: ssl.SSLContext | _Unset | None = UNSET,
) -> BrokerConfig | None:
    """Resolve ``connection_settings`` to a :class:`BrokerConfig`, or ``None``
    when the broker is disabled.

    The default settings (nothing given) are remembered until what they come
    from changes (:func:`_resolve_default`): every ``publish_domain_event``
    asks for them.

    Raises:
        ConfigurationError: a URL is malformed, a TLS file cannot be used, or
            the broker file cannot be read.
        TypeError: ``ssl_context`` is not an :class:`ssl.SSLContext`.
    """
    if (
        isinstance(connection_settings, _Unset)
        and isinstance(timeout, _Unset)
        and isinstance(ssl_context, _Unset)
    ):
        return _resolve_default()
    return _resolve(connection_settings, timeout, ssl_context)


#: The default settings, resolved, with what they were resolved from.
_resolved_default: tuple[tuple[object, ...], BrokerConfig | None] | None = None


def _resolve_default() -> BrokerConfig | None:
    """``_resolve()`` of the defaults, remembered while the environment
    variable and :func:`configure`'s broker, timeout and SSL context stay
    the same. Not remembered while ``DOMAIN_EVENT_BROKER_FILE`` is set: the
    file is looked at each time, and read again as soon as it changes."""
    global _resolved_default  # noqa: PLW0603
    environ = os.environ
    if environ.get(FILE_ENVIRONMENT_VARIABLE):
        return _resolve(UNSET, UNSET, UNSET)
    broker = _defaults.broker
    if not isinstance(broker, (str, _Unset, type(None))):
        broker = tuple(broker)  # a list given to configure() may be changed later
    key = (environ.get(ENVIRONMENT_VARIABLE), broker, _defaults.timeout, _defaults.ssl_context)
    cached = _resolved_default
    if cached is not None and cached[0] == key:
        return cached[1]
    config = _resolve(UNSET, UNSET, UNSET)
    _resolved_default = (key, config)
    return config


def _resolve(
    connection_settings: ConnectionSettings,
    timeout: float | _Unset,
    ssl_context: ssl.SSLContext | _Unset | None,
) -> BrokerConfig | None:
    """What :func:`resolve` says, worked out now."""
    if isinstance(ssl_context, _Unset):
        context = _defaults.ssl_context
    else:
        _check_ssl_context(ssl_context)
        context = ssl_context
        if context is not None:
            _tls.warn_if_unverified(context, "this publisher or subscriber")
    seconds = default_timeout(timeout)
    settings: str | Sequence[str] | _Unset | None = connection_settings
    if isinstance(settings, str) and not settings.strip():
        # 3.0.2 used '' to mean "the default broker".
        settings = UNSET
    reread = isinstance(settings, _Unset)
    if isinstance(settings, _Unset):
        settings = _configured_settings()
    if settings is None:
        return None
    urls = _checked_urls(settings, context is not None)
    return BrokerConfig(urls=urls, timeout=seconds, ssl_context=context, reread=reread)


def _configured_settings() -> str | Sequence[str] | None:
    """The settings of the configured source: the environment (or the broker
    file), else :func:`configure`'s, else :data:`DEFAULT_URL`."""
    settings = _from_environment() or _defaults.broker
    return DEFAULT_URL if isinstance(settings, _Unset) else settings


def _checked_urls(settings: str | Sequence[str], own_context: bool) -> tuple[str, ...]:
    urls = _as_tuple(settings)
    _parse_urls(urls)
    _check_tls(urls, own_context)
    return urls


def current(config: BrokerConfig) -> BrokerConfig:
    """``config`` with the URLs its source holds now, for a new connection.

    A config resolved from the configured source (``config.reread``) reads
    the environment, the broker file and :func:`configure` again: a secret
    manager that rewrote ``DOMAIN_EVENT_BROKER_FILE`` with a new password is
    followed by every reconnection, not only by new publishers. The file is
    read again whatever its size and times say. Other configs are returned
    as they are.

    If the source cannot be used now (a file half written, a malformed URL,
    the broker disabled), the previous URLs are kept, with a WARNING; the
    next connection looks again.
    """
    if not config.reread:
        return config
    # Read the file itself, not what its size and times say: a rotation that
    # keeps both (same length, ``cp -p``, one clock tick) is still a change.
    _read_broker_file.cache_clear()
    try:
        settings = _configured_settings()
        if settings is None:
            raise ConfigurationError("the broker is disabled now (None)")
        urls = _checked_urls(settings, config.ssl_context is not None)
    except ConfigurationError as exc:
        log.warning(
            "Could not read the broker settings again (%s); connecting with the previous ones",
            exc,
        )
        return config
    if urls == config.urls:
        return config
    changed = dataclasses.replace(config, urls=urls)
    log.info("The broker settings changed; connecting to %s", changed.display)
    return changed


# -- TLS and the broker file (issue 15) ----------------------------------------------


def _pika_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``, TLS left out (cheap: to read other options)."""
    return _tls.parameters(url, redact(url), None, tls=False)


@functools.lru_cache(maxsize=64)
def _check_tls(urls: tuple[str, ...], own_context: bool) -> None:
    """Read the TLS files of ``urls`` once, so that a typo fails before connecting.

    A plain ``amqp://`` URL touches no TLS machinery at all: building an
    :class:`ssl.SSLContext` takes OpenSSL's locks, and a child forked while
    another thread holds one would hang in its own first publish.
    """
    for url in urls:
        if not url.lower().startswith("amqps://"):
            continue  # split_url() already refused TLS options on it
        shown = redact(url)
        _tls.check_settings(_tls.split_url(url, shown)[1], shown, own_context)


def _check_ssl_context(context: object) -> None:
    if context is not None and not isinstance(context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(context).__name__}")


def _from_environment() -> str:
    """The URL(s) from ``DOMAIN_EVENT_BROKER`` or ``DOMAIN_EVENT_BROKER_FILE``; ``''`` if unset.

    Raises:
        ConfigurationError: both are set, or the file cannot be read.
    """
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    path = os.environ.get(FILE_ENVIRONMENT_VARIABLE, "").strip()
    if value and path:
        raise ConfigurationError(
            f"both {ENVIRONMENT_VARIABLE} and {FILE_ENVIRONMENT_VARIABLE} are set: set one"
        )
    if not path:
        return value
    return read_broker_file(path, source=FILE_ENVIRONMENT_VARIABLE)


def read_broker_file(path: str, *, source: str = "the broker file") -> str:
    """The URL(s) held by the file at ``path``: one or more, separated by
    white space, commas or new lines; lines starting with ``#`` are comments.

    The file is read again when it changes (a rotated secret), not on every
    call. Error messages name the file, never what it holds.

    Args:
        path: the file.
        source: where the path came from, for error messages.

    Raises:
        ConfigurationError: the file cannot be read, is not UTF-8 text, or
            holds no URL.

    .. versionadded:: 4.1
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ConfigurationError(
            f"{source} names {path!r}, which cannot be read: {exc.strerror or exc}"
        ) from None
    return _read_broker_file(path, stat.st_ino, stat.st_mtime_ns, stat.st_size, source)


@functools.lru_cache(maxsize=8)
def _read_broker_file(path: str, inode: int, mtime_ns: int, size: int, source: str) -> str:
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise ConfigurationError(
            f"{source} names {path!r}, which cannot be read: {exc.strerror or exc}"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{source} names {path!r}, which is not UTF-8 text") from None
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    urls = " ".join(lines).strip()
    if not urls:
        raise ConfigurationError(f"{source} names {path!r}, which holds no AMQP URL")
    return urls
