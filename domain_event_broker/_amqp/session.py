"""What one live connection reports, for ``domain-event-broker status``: the
node that answered and, over TLS, the negotiated session and when the
server's certificate expires.

Loaded by ``status`` only, not by publishing or consuming.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, Final

from .config import BrokerConfig
from .connect import _connect, close_quietly
from .pika_internals import ssl_socket

__all__ = ["UNKNOWN_SESSION", "ConnectionInfo", "SessionInfo", "connection_info", "session_info"]


@dataclass(frozen=True)
class SessionInfo:
    """What a TLS connection negotiated, and the server's certificate expiry."""

    version: str
    cipher: str
    bits: int | None
    #: When the server's certificate expires (UTC), ``None`` when unknown.
    not_after: datetime.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "tls": True,
            "version": self.version,
            "cipher": self.cipher,
            "bits": self.bits,
            "certificate_expires": None if self.not_after is None else self.not_after.isoformat(),
        }


#: A TLS session whose details pika did not show (its fast paths are off).
UNKNOWN_SESSION: Final = SessionInfo("TLS", "(session details unavailable)", None, None)


def session_info(sock: ssl.SSLSocket | ssl.SSLObject) -> SessionInfo:
    """The TLS details of a connection's socket (see
    :func:`.pika_internals.ssl_socket`)."""
    cipher = sock.cipher()
    der = sock.getpeercert(binary_form=True)
    return SessionInfo(
        version=sock.version() or "?",
        cipher=cipher[0] if cipher else "?",
        bits=cipher[2] if cipher else None,
        not_after=None if der is None else certificate_not_after(der),
    )


def certificate_not_after(der: bytes) -> datetime.datetime | None:
    """The ``notAfter`` time of a DER-encoded X.509 certificate, ``None`` if unreadable.

    Read from the bytes because ``getpeercert()`` returns nothing when the
    certificate was not verified (``verify_none``).
    """
    try:
        _, start, end = _tlv(der, 0, 0x30)  # Certificate
        _, start, end = _tlv(der, start, 0x30)  # TBSCertificate
        if der[start] == 0xA0:  # [0] version
            start = _tlv(der, start)[2]
        for tag in (0x02, 0x30, 0x30):  # serialNumber, signature, issuer
            start = _tlv(der, start, tag)[2]
        _, start, _ = _tlv(der, start, 0x30)  # Validity
        start = _tlv(der, start)[2]  # notBefore
        tag, start, end = _tlv(der, start)  # notAfter
        return _asn1_time(tag, der[start:end].decode("ascii"))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _tlv(data: bytes, position: int, expected: int | None = None) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``position``."""
    tag = data[position]
    if expected is not None and tag != expected:
        raise ValueError(f"tag {tag:#x}, expected {expected:#x}")
    length = data[position + 1]
    position += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("unsupported length")
        length = int.from_bytes(data[position : position + count], "big")
        position += count
    if position + length > len(data):
        raise ValueError("truncated")
    return tag, position, position + length


def _asn1_time(tag: int, text: str) -> datetime.datetime:
    if tag == 0x17 and re.fullmatch(r"\d{12}Z", text):  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif not (tag == 0x18 and re.fullmatch(r"\d{14}Z", text)):  # GeneralizedTime
        raise ValueError("not a UTC time")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class ConnectionInfo:
    """Which node a connection reached, and how (for ``status``)."""

    host: str
    port: int
    #: ``None`` for plain AMQP.
    tls: SessionInfo | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        details = {"tls": False} if self.tls is None else self.tls.as_dict()
        return {"host": self.host, "port": self.port, **details}

    def describe(self, now: datetime.datetime | None = None) -> str:
        """One line, e.g. ``localhost:5671 TLSv1.3 TLS_AES_256_GCM_SHA384, server
        certificate expires 2027-01-31 12:00 UTC (in 64 days)``."""
        where = f"{self.host}:{self.port}"
        if self.tls is None:
            return f"{where} plain AMQP (no TLS)"
        text = f"{where} {self.tls.version} {self.tls.cipher}"
        expiry = self.tls.not_after
        if expiry is None:
            return f"{text}, server certificate expiry unknown"
        left = expiry - (now or datetime.datetime.now(datetime.timezone.utc))
        when = expiry.strftime("%Y-%m-%d %H:%M UTC")
        if left.total_seconds() < 0:
            return f"{text}, server certificate EXPIRED {when} ({_span(-left)} ago)"
        return f"{text}, server certificate expires {when} (in {_span(left)})"


def _span(delta: datetime.timedelta) -> str:
    if delta.days >= 2:
        return f"{delta.days} days"
    hours = int(delta.total_seconds() // 3600)
    return f"{hours} hours" if hours >= 2 else f"{int(delta.total_seconds() // 60)} minutes"


def connection_info(config: BrokerConfig) -> ConnectionInfo:
    """Connect once and tell which node answered, over TLS or not (for ``status``).

    Raises:
        AuthenticationError, TLSError, BrokerUnavailableError: as :func:`connect`.
    """
    name = f"domain-event-broker status (pid {os.getpid()})"
    connection, params = _connect(config, name, None, None)
    try:
        session = None
        if params.ssl_options is not None:
            sock = ssl_socket(connection)
            session = UNKNOWN_SESSION if sock is None else session_info(sock)
        return ConnectionInfo(params.host, params.port, session)
    finally:
        close_quietly(connection)
