"""TLS options, the broker file, redaction and failure messages, without a broker."""

from __future__ import annotations

import datetime
import os
import ssl
import urllib.parse
from pathlib import Path

import pika.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_event_broker import ConfigurationError, Publisher, configure
from domain_event_broker._amqp import config as _config
from domain_event_broker._amqp import session as _session
from domain_event_broker._amqp import tls as _tls
from domain_event_broker._amqp.config import redact, resolve

from .certs import Certificates

# -- URL options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "amqps://h/%2F?verify=maybe",
            "verify must be verify_peer or verify_none, not 'maybe'",
        ),
        ("amqps://h/%2F?auth_mechanism=kerberos", "auth_mechanism must be external or plain"),
        ("amqps://h/%2F?keyfile=/k.pem", "keyfile needs certfile (the client certificate)"),
        ("amqp://h/%2F?cacertfile=/ca.pem", "the TLS options (cacertfile) need an amqps:// URL"),
        ("amqps://h/%2F?cacertfile=/a&cacertfile=/b", "cacertfile is given twice"),
        ("amqps://h/%2F?cacertfile=", "cacertfile is empty"),
        (
            "amqps://h/%2F?ssl_options={'password':'pw-secret'}&verify=verify_none",
            "pika's ssl_options cannot be combined with verify",
        ),
        (
            "amqps://u:pw-secret@h/%2F?auth_mechanism=external&certfile=/c",
            "auth_mechanism=external logs in with the client certificate: "
            "leave the user name and password out of the URL",
        ),
    ],
)
def test_bad_options_are_refused_before_connecting(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Publisher(url)
    assert message in str(caught.value)
    assert "pw-secret" not in str(caught.value)


def test_files_are_checked_before_connecting(tmp_path: Path, certs: Certificates) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError, match=r"cacertfile '.*missing.pem' cannot be read"):
        Publisher(f"amqps://h/%2F?cacertfile={missing}")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="holds no usable PEM data"):
        Publisher(f"amqps://h/%2F?cacertfile={not_pem}")
    with pytest.raises(ConfigurationError, match=r"certfile/keyfile .* cannot be read"):
        Publisher(f"amqps://h/%2F?certfile={missing}")


def test_configure_checks_the_files_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        configure(broker=f"amqps://h/%2F?cacertfile={tmp_path / 'missing.pem'}")


def test_encrypted_key_is_refused_without_a_prompt(certs: Certificates) -> None:
    key = certs.client_encrypted_key
    with pytest.raises(ConfigurationError) as caught:
        Publisher(f"amqps://h/%2F?certfile={certs.client.cert}&keyfile={key}")
    assert "is encrypted, and an AMQP URL cannot hold its passphrase" in str(caught.value)
    assert key.read_text() not in str(caught.value)


def test_ssl_context_must_be_a_context_and_must_not_clash(certs: Certificates) -> None:
    with pytest.raises(TypeError, match=r"ssl_context must be an ssl\.SSLContext"):
        configure(ssl_context="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Publisher("amqps://h/%2F", ssl_context=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cacertfile cannot be combined with ssl_context"):
        Publisher(f"amqps://h/%2F?cacertfile={certs.ca}", ssl_context=ssl.create_default_context())


def test_context_built_again_only_when_a_file_changed(tmp_path: Path, certs: Certificates) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.ca.read_bytes())
    settings = _tls.split_url(f"amqps://h/%2F?cacertfile={ca}", "")[1]
    first = _tls._context_for(settings)
    assert _tls._context_for(settings) is first
    ca.write_bytes(certs.ca_and_other_ca.read_bytes())  # renewed: another size
    renewed = _tls._context_for(settings)
    assert renewed is not first
    assert len(renewed.get_ca_certs()) == 2


def test_verification_on_by_default() -> None:
    config = resolve("amqps://h/%2F")
    assert config is not None
    params = config.parameters("x", 5)[0]
    context = params.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert params.ssl_options.server_hostname == "h"
    assert params.port == 5671


_OTHER = st.sampled_from(["heartbeat", "socket_timeout", "channel_max", "frame_max"])
_TLS_NAMES = st.sampled_from(["cacertfile", "server_name_indication", "verify"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_OTHER, st.integers(1, 600)), max_size=4, unique_by=lambda p: p[0]),
    st.dictionaries(_TLS_NAMES, st.text(min_size=1, max_size=20), max_size=3),
    st.randoms(use_true_random=False),
)
def test_split_url_keeps_other_options_and_decodes_tls_ones(
    other: list[tuple[str, int]], tls: dict[str, str], random: object
) -> None:
    if "verify" in tls:
        tls["verify"] = "verify_none" if len(tls["verify"]) % 2 else "verify_peer"
    fields = [f"{name}={value}" for name, value in other]
    for name, value in tls.items():
        fields.insert(
            random.randrange(len(fields) + 1),  # type: ignore[attr-defined]
            f"{name}={urllib.parse.quote(value, safe='')}",
        )
    url = "amqps://u:p@h:5671/%2F" + ("?" + "&".join(fields) if fields else "")
    pika_url, found = _tls.split_url(url, redact(url))
    assert pika_url == "amqps://u:p@h:5671/%2F" + (
        "?" + "&".join(f"{n}={v}" for n, v in other) if other else ""
    )
    assert found.cacertfile == tls.get("cacertfile")
    assert found.server_name_indication == tls.get("server_name_indication")
    assert found.verify == (tls.get("verify", "verify_peer") == "verify_peer")
    assert found.given == frozenset(tls)


# -- redaction ---------------------------------------------------------------------------

#: Marked at both ends: a bare "secret" that is part of the URLs' or the
#: messages' own text (hypothesis tries the code's literals, e.g. "heartbea")
#: would be found however well it is hidden.
_SECRET = st.text(
    alphabet=st.characters(categories=("Lu", "Ll", "Nd")), min_size=8, max_size=30
).map(lambda text: f"Qz{text}9Xj")


@settings(deadline=None, max_examples=30)  # pika builds a context per amqps:// URL it parses
@given(_SECRET)
def test_passwords_and_passphrases_never_shown(secret: str) -> None:
    with_password = f"amqps://app:{secret}@h/%2F?verify=nope"
    with pytest.raises(ConfigurationError) as caught:
        resolve(with_password)
    assert secret not in str(caught.value)
    legacy = f"amqps://app@h/%2F?ssl_options={{'password':'{secret}'}}&heartbeat=nope"
    assert secret not in redact(legacy)
    with pytest.raises(ConfigurationError) as caught:
        resolve(legacy)
    assert secret not in str(caught.value)


# -- the broker file ---------------------------------------------------------------------


def test_broker_file_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "broker"
    monkeypatch.setenv("DOMAIN_EVENT_BROKER_FILE", str(secret))
    with pytest.raises(ConfigurationError) as caught:
        resolve()
    assert str(caught.value) == (
        f"DOMAIN_EVENT_BROKER_FILE names {str(secret)!r}, which cannot be read: "
        f"No such file or directory"
    )
    secret.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigurationError, match="which holds no AMQP URL"):
        resolve()
    secret.write_bytes(b"\xff\xfeamqp://u:pw@h/")
    with pytest.raises(ConfigurationError, match="which is not UTF-8 text"):
        resolve()
    secret.write_text("amqp://u:pw-from-file@a/%2F,\namqp://u:pw-from-file@b/%2F\n")
    config = resolve()
    assert config is not None
    assert config.urls == ("amqp://u:pw-from-file@a/%2F", "amqp://u:pw-from-file@b/%2F")
    assert "pw-from-file" not in repr(config)
    monkeypatch.setenv("DOMAIN_EVENT_BROKER", "amqp://h/%2F")
    with pytest.raises(ConfigurationError, match="both DOMAIN_EVENT_BROKER and"):
        resolve()


def test_broker_file_is_read_again_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "broker"
    secret.write_text("amqp://first/%2F")
    monkeypatch.setenv("DOMAIN_EVENT_BROKER_FILE", str(secret))
    assert resolve().urls == ("amqp://first/%2F",)  # type: ignore[union-attr]
    secret.write_text("amqp://second-node/%2F")
    stat = secret.stat()
    os.utime(secret, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert resolve().urls == ("amqp://second-node/%2F",)  # type: ignore[union-attr]


def test_argument_beats_the_broker_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOMAIN_EVENT_BROKER_FILE", str(tmp_path / "missing"))
    assert resolve("amqp://arg/%2F").urls == ("amqp://arg/%2F",)  # type: ignore[union-attr]
    assert _config.resolve(None) is None


# -- failure messages --------------------------------------------------------------------


def _alert(reason: str) -> BaseException:
    # What pika raises when the broker sends an alert after the handshake.
    return pika.exceptions.IncompatibleProtocolError(
        f"StreamLostError: (\"Stream connection lost: SSLError(1, '[SSL: {reason}] x')\",)"
    )


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "refused the client certificate: it has expired"),
        ("TLSV1_ALERT_UNKNOWN_CA", "refused the client certificate: it is not signed by"),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "requires one and none was sent"),
        ("WRONG_VERSION_NUMBER", "did not answer with TLS"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", "share no TLS version or cipher suite"),
    ],
)
def test_failure_causes(reason: str, cause: str) -> None:
    found = _tls.failure_cause(_alert(reason), "h", 5671, "h")
    assert found is not None
    assert cause in found


@given(st.text(max_size=200).filter(lambda text: "[SSL:" not in text))
def test_other_errors_are_not_tls_failures(text: str) -> None:
    for error in (pika.exceptions.AMQPConnectionError(text), ConnectionResetError(104, text)):
        assert _tls.failure_cause(error, "h", 5671, "h") is None


# -- certificate expiry ------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())


def _certificate(not_after: datetime.datetime) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "x")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(1950, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(not_after)
        .sign(_KEY, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.datetimes(
        min_value=datetime.datetime(1950, 1, 2),
        max_value=datetime.datetime(9999, 12, 31),
        timezones=st.just(datetime.timezone.utc),
    )
)
def test_certificate_expiry_read_from_der(not_after: datetime.datetime) -> None:
    # UTCTime before 2050, GeneralizedTime from 2050 on.
    assert _session.certificate_not_after(_certificate(not_after)) == not_after.replace(
        microsecond=0
    )


@given(st.binary(max_size=300))
def test_certificate_expiry_of_garbage_is_unknown(data: bytes) -> None:
    result = _session.certificate_not_after(data)
    assert result is None or result.tzinfo is datetime.timezone.utc


def test_connection_info_line() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    session = _session.SessionInfo(
        "TLSv1.3", "TLS_AES_256_GCM_SHA384", 256, now + datetime.timedelta(days=30)
    )
    info = _session.ConnectionInfo("rabbit", 5671, session)
    assert info.describe(now) == (
        "rabbit:5671 TLSv1.3 TLS_AES_256_GCM_SHA384, "
        "server certificate expires 2026-01-31 00:00 UTC (in 30 days)"
    )
    expired = _session.ConnectionInfo(
        "rabbit", 5671, _session.SessionInfo("TLSv1.2", "C", 128, now)
    )
    assert "server certificate EXPIRED 2026-01-01 00:00 UTC (5 hours ago)" in expired.describe(
        now + datetime.timedelta(hours=5)
    )
    assert (
        _session.ConnectionInfo("rabbit", 5672, None).describe()
        == "rabbit:5672 plain AMQP (no TLS)"
    )
