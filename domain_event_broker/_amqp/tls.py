"""TLS: the URL's TLS options, the SSL context, failures, and session details.

The query parameters are those of RabbitMQ's URI scheme
(https://www.rabbitmq.com/docs/uri-query-parameters):

- ``cacertfile``: PEM file of the certificate authorities to trust (default:
  the system's trust store);
- ``certfile`` / ``keyfile``: the client certificate and its private key;
- ``verify``: ``verify_peer`` (default) or ``verify_none`` (logs a WARNING);
- ``server_name_indication``: the host name to send (SNI) and to check the
  server's certificate against (default: the URL's host);
- ``auth_mechanism``: ``external`` logs in with the client certificate
  (RabbitMQ's ``rabbitmq_auth_mechanism_ssl`` plugin), ``plain`` is the default.

pika does not know these parameters: :func:`split_url` takes them out of the
URL before pika sees it. This module imports nothing from the rest of the
package but :mod:`.errors`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Final

import pika
import pika.credentials

from ..errors import ConfigurationError

log = logging.getLogger(__name__)

#: The query parameters this module handles (pika never sees them).
TLS_PARAMETERS: Final = frozenset(
    {"cacertfile", "certfile", "keyfile", "verify", "server_name_indication", "auth_mechanism"}
)
#: Parameters that a caller's own ``ssl.SSLContext`` already decides.
_CONTEXT_PARAMETERS: Final = frozenset({"cacertfile", "certfile", "keyfile", "verify"})

_VERIFY_VALUES: Final = {"verify_peer": True, "verify_none": False}
_AUTH_MECHANISMS: Final = frozenset({"plain", "external"})

#: Oldest TLS version offered: what RabbitMQ and managed services accept.
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TLSSettings:
    """The TLS options of one URL."""

    cacertfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    server_name_indication: str | None = None
    external: bool = False
    #: Which of the parameters the URL sets itself.
    given: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=64)
def split_url(url: str, shown: str) -> tuple[str, TLSSettings]:
    """Take the TLS parameters out of ``url``.

    Args:
        url: an AMQP URL.
        shown: the URL without its password, for error messages.

    Returns:
        The URL without the TLS parameters (for pika), and the settings.

    Raises:
        ConfigurationError: a TLS parameter is repeated, has a wrong value, or
            is given for an ``amqp://`` URL; or ``keyfile`` lacks ``certfile``.
    """
    base, separator, rest = url.partition("?")
    if not separator:
        return url, TLSSettings()
    query, hash_mark, fragment = rest.partition("#")
    kept: list[str] = []
    values: dict[str, str] = {}
    for field in query.split("&"):
        name = urllib.parse.unquote_plus(field.partition("=")[0])
        if name not in TLS_PARAMETERS:
            kept.append(field)
            continue
        if name in values:
            raise ConfigurationError(f"malformed AMQP URL {shown!r}: {name} is given twice")
        values[name] = urllib.parse.unquote_plus(field.partition("=")[2])
    if not values:
        return url, TLSSettings()
    if any(urllib.parse.unquote_plus(field.partition("=")[0]) == "ssl_options" for field in kept):
        raise ConfigurationError(
            f"malformed AMQP URL {shown!r}: pika's ssl_options cannot be combined with "
            f"{', '.join(sorted(values))}; use the latter only"
        )
    remaining = "&".join(kept)
    pika_url = base + ("?" + remaining if remaining else "") + hash_mark + fragment
    return pika_url, _settings(values, url, shown)


#: pika's own ``ssl_options`` query parameter (a dict literal) may hold a key
#: passphrase: its value is never shown.
_SSL_OPTIONS_VALUE = re.compile(r"([?&]ssl_options=)[^&#]*", re.IGNORECASE)


def redact_query(url: str) -> str:
    """``url`` with the value of pika's ``ssl_options`` parameter replaced by ``***``."""
    return _SSL_OPTIONS_VALUE.sub(r"\1***", url)


def _settings(values: dict[str, str], url: str, shown: str) -> TLSSettings:
    def fail(reason: str) -> ConfigurationError:
        return ConfigurationError(f"malformed AMQP URL {shown!r}: {reason}")

    if not url.lower().startswith("amqps://"):
        raise fail(f"the TLS options ({', '.join(sorted(values))}) need an amqps:// URL")
    for name in ("cacertfile", "certfile", "keyfile", "server_name_indication"):
        if name in values and not values[name]:
            raise fail(f"{name} is empty")
    verify = values.get("verify", "verify_peer")
    if verify not in _VERIFY_VALUES:
        raise fail(f"verify must be verify_peer or verify_none, not {verify!r}")
    mechanism = values.get("auth_mechanism", "plain").lower()
    if mechanism not in _AUTH_MECHANISMS:
        raise fail(f"auth_mechanism must be external or plain, not {mechanism!r}")
    if "keyfile" in values and "certfile" not in values:
        raise fail("keyfile needs certfile (the client certificate)")
    if mechanism == "external":
        userinfo = urllib.parse.urlsplit(url).netloc.rpartition("@")
        if userinfo[1]:
            raise fail(
                "auth_mechanism=external logs in with the client certificate: "
                "leave the user name and password out of the URL"
            )
    return TLSSettings(
        cacertfile=values.get("cacertfile"),
        certfile=values.get("certfile"),
        keyfile=values.get("keyfile"),
        verify=_VERIFY_VALUES[verify],
        server_name_indication=values.get("server_name_indication"),
        external=mechanism == "external",
        given=frozenset(values),
    )


def check_settings(settings: TLSSettings, shown: str, own_context: bool) -> None:
    """Checks that need the files or the caller's context: fail before connecting.

    Raises:
        ConfigurationError: a file cannot be read or is not PEM, the key is
            encrypted, ``auth_mechanism=external`` has no client certificate,
            or URL options clash with ``ssl_context``.
    """
    if own_context:
        clash = sorted(settings.given & _CONTEXT_PARAMETERS)
        if clash:
            raise ConfigurationError(
                f"AMQP URL {shown!r}: {', '.join(clash)} cannot be combined with "
                f"ssl_context: set them on the ssl.SSLContext instead"
            )
        return
    if settings.external and not settings.certfile:
        raise ConfigurationError(
            f"AMQP URL {shown!r}: auth_mechanism=external needs a client certificate "
            f"(certfile=..., keyfile=...)"
        )
    build_context(settings)
    if not settings.verify:
        log.warning(
            "TLS certificate verification is off for %s (verify=verify_none): anyone able "
            "to intercept the connection can read and change what is sent",
            shown,
        )


def build_context(settings: TLSSettings) -> ssl.SSLContext:
    """A client ``SSLContext`` for ``settings``.

    Verifies the server's certificate against ``cacertfile`` (or the system's
    trust store) and its host name, unless ``verify_none``.

    Raises:
        ConfigurationError: a file cannot be read, is not PEM, or the key is
            encrypted (a URL cannot hold a passphrase; pass an ``ssl_context``).
    """
    try:
        context = ssl.create_default_context(cafile=settings.cacertfile)
    except (OSError, ssl.SSLError) as exc:
        raise _file_error("cacertfile", settings.cacertfile, exc) from None
    context.minimum_version = MINIMUM_VERSION
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.certfile:
        try:
            context.load_cert_chain(
                settings.certfile, settings.keyfile, password=_refuse_passphrase
            )
        except _EncryptedKeyError:
            raise ConfigurationError(
                f"the private key in {settings.keyfile or settings.certfile!r} is encrypted, "
                f"and an AMQP URL cannot hold its passphrase: load it into an "
                f"ssl.SSLContext and pass ssl_context=..."
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise _file_error("certfile/keyfile", settings.certfile, exc) from None
    return context


def _context_for(settings: TLSSettings) -> ssl.SSLContext:
    """:func:`build_context`, built again only when one of its files changed.

    Building one from the system's trust store takes some 20 ms, and a
    connection attempt needs one per node; a renewed certificate must still
    be picked up at the next connection.
    """
    stamps = []
    for path in (settings.cacertfile, settings.certfile, settings.keyfile):
        if path:
            try:
                stat = os.stat(path)
            except OSError:
                return build_context(settings)  # raises the clear error
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return _cached_context(settings, tuple(stamps))


@functools.lru_cache(maxsize=32)
def _cached_context(
    settings: TLSSettings, stamps: tuple[tuple[int, int, int], ...]
) -> ssl.SSLContext:
    return build_context(settings)


class _EncryptedKeyError(Exception):
    pass


def _refuse_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal: a hang in a worker.
    raise _EncryptedKeyError


def _file_error(name: str, path: str | None, exc: BaseException) -> ConfigurationError:
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or type(exc).__name__
        return ConfigurationError(f"{name} {path!r} holds no usable PEM data ({reason})")
    if isinstance(exc, OSError):
        return ConfigurationError(f"{name} {path!r} cannot be read: {exc.strerror or exc}")
    return ConfigurationError(f"{name} {path!r} cannot be used: {type(exc).__name__}")


def warn_if_unverified(context: ssl.SSLContext, where: str) -> None:
    """Log a WARNING when a caller's ``context`` does not verify the server."""
    if context.verify_mode == ssl.CERT_NONE:
        log.warning(
            "TLS certificate verification is off in the ssl_context for %s: anyone able "
            "to intercept the connection can read and change what is sent",
            where,
        )


def parameters(
    url: str,
    shown: str,
    context: ssl.SSLContext | None,
    *,
    tls: bool = True,
) -> pika.URLParameters:
    """pika's parameters for ``url``, with its TLS options applied.

    pika builds a context from the system's trust store for every
    ``amqps://`` URL it parses (some 20 ms) and sends no server name: it is
    handed the URL as ``amqp://`` and the TLS options are set here instead.
    A URL with pika's own ``ssl_options`` parameter goes to pika unchanged.

    Args:
        url: an AMQP URL.
        shown: the URL without its password, for error messages.
        context: the caller's context; ``None`` builds one from the URL.
        tls: ``False`` leaves TLS out (to read other options cheaply).

    Raises:
        ConfigurationError: see :func:`split_url` and :func:`build_context`.
        ValueError: pika refuses the URL.
    """
    pika_url, settings = split_url(url, shown)
    query = urllib.parse.urlsplit(pika_url).query
    if not pika_url.lower().startswith("amqps://") or "ssl_options" in urllib.parse.parse_qs(query):
        return pika.URLParameters(pika_url)
    params = pika.URLParameters("amqp://" + pika_url[len("amqps://") :])
    if urllib.parse.urlsplit(pika_url).port is None:
        params.port = pika.ConnectionParameters.DEFAULT_SSL_PORT
    if tls:
        context = _context_for(settings) if context is None else context
        server_name = settings.server_name_indication or params.host
        params.ssl_options = pika.SSLOptions(context, server_name)
    if settings.external:
        params.credentials = pika.credentials.ExternalCredentials()
    return params


# -- failures -----------------------------------------------------------------------

_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")

#: OpenSSL verification codes (X509_V_ERR_*) for an unknown issuer.
_UNKNOWN_ISSUER_CODES: Final = frozenset({2, 18, 19, 20, 21})
_EXPIRED: Final = 10
_NOT_YET_VALID: Final = 9
_HOSTNAME_MISMATCH: Final = 62

#: OpenSSL reasons meaning "the peer does not speak TLS" (e.g. a plain AMQP port).
_NOT_TLS_REASONS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)

#: Alerts the broker sends when it refuses the client certificate, and what they mean.
_CLIENT_CERTIFICATE_ALERTS: Final = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by a certificate authority the broker trusts",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker found it invalid",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it has been revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the broker could not verify it",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the broker does not support its type",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the broker requires one and none was sent "
    "(set certfile= and keyfile=)",
}
_NEGOTIATION_ALERTS: Final = frozenset(
    {
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "UNSUPPORTED_PROTOCOL",
        "NO_SHARED_CIPHER",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)


def failure_cause(exc: BaseException, host: str, port: int, server_name: str | None) -> str | None:
    """What went wrong, when ``exc`` is a TLS failure that retrying cannot fix.

    pika raises certificate errors as they are, and reports alerts received
    after the handshake (the broker refusing the client certificate) only as
    text inside ``IncompatibleProtocolError``: both are recognised.

    Args:
        exc: what pika raised for one connection attempt.
        host: the host connected to.
        port: the port connected to.
        server_name: the name the certificate was checked against.

    Returns:
        One sentence naming the cause, or ``None`` (not a TLS failure, or one
        that may pass, such as a connection reset during the handshake).
    """
    where = f"{host}:{port}"
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            return _verification_cause(error, where, server_name or host)
    text = " ".join(str(error) for error in _chain(exc))
    for reason in _SSL_REASON.findall(text):
        if reason in _NOT_TLS_REASONS:
            return (
                f"{where} did not answer with TLS: it looks like a plain AMQP port "
                f"(amqps:// needs the broker's TLS port, by default 5671)"
            )
        if reason in _CLIENT_CERTIFICATE_ALERTS:
            return (
                f"the broker at {where} refused the client certificate: "
                f"{_CLIENT_CERTIFICATE_ALERTS[reason]}"
            )
        if reason in _NEGOTIATION_ALERTS:
            return (
                f"the TLS handshake with {where} failed ({reason}): client and broker "
                f"share no TLS version or cipher suite (TLS 1.2 or later is required)"
            )
    return None


def _verification_cause(error: ssl.SSLCertVerificationError, where: str, name: str) -> str:
    code = error.verify_code
    detail = error.verify_message or error.reason or str(error)
    if code in _UNKNOWN_ISSUER_CODES:
        return (
            f"the certificate of {where} is not signed by a trusted certificate authority "
            f"({detail}): set cacertfile= to the CA that signed it"
        )
    if code == _EXPIRED:
        return f"the certificate of {where} has expired"
    if code == _NOT_YET_VALID:
        return f"the certificate of {where} is not valid yet (check the clocks)"
    if code == _HOSTNAME_MISMATCH:
        return (
            f"the certificate of {where} is not valid for the host name {name!r}: connect "
            f"with a name it lists, or set server_name_indication= to one"
        )
    return f"the certificate of {where} failed verification ({detail})"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, the exceptions in its ``args``, and their causes."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 16:
        error = todo.pop(0)
        if any(error is known for known in seen):
            continue
        seen.append(error)
        todo.extend(arg for arg in error.args if isinstance(arg, BaseException))
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return seen
