"""Certificates made at test time: two CAs, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Common name of the client certificate; the EXTERNAL login's user name.
CLIENT_CN = "deb-tls-client"

#: Passphrase of the encrypted copy of the client key.
KEY_PASSPHRASE = b"s3cret-key-passphrase"


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    """Every file the TLS tests use."""

    ca: Path
    other_ca: Path
    server: Pair
    expired_server: Pair
    client: Pair
    client_encrypted_key: Path
    expired_client: Pair
    other_ca_client: Pair
    ca_and_other_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "domain-event-broker tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class _Authority:
    def __init__(self, common_name: str) -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        expired: bool = False,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            not_before, not_after = (
                now - datetime.timedelta(days=30),
                now - datetime.timedelta(days=1),
            )
        else:
            not_before, not_after = (
                now - datetime.timedelta(days=1),
                now + datetime.timedelta(days=10),
            )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()), key


def _write_cert(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs))
    return path


def _write_key(
    path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None
) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    path.chmod(0o644)  # the broker may run as another user (e.g. rabbitmq)
    return path


def make_certificates(directory: Path) -> Certificates:
    """Write a fresh set of certificates and keys into ``directory``."""
    ca = _Authority("deb-tls test CA")
    other = _Authority("deb-tls other CA")

    def pair(name: str, authority: _Authority, common_name: str, **kwargs: bool) -> Pair:
        cert, key = authority.issue(common_name, **kwargs)
        return Pair(
            _write_cert(directory / f"{name}.crt", cert), _write_key(directory / f"{name}.key", key)
        )

    client_cert, client_key = ca.issue(CLIENT_CN, server=False)
    client = Pair(
        _write_cert(directory / "client.crt", client_cert),
        _write_key(directory / "client.key", client_key),
    )
    return Certificates(
        ca=_write_cert(directory / "ca.crt", ca.cert),
        other_ca=_write_cert(directory / "other-ca.crt", other.cert),
        server=pair("server", ca, "localhost", server=True),
        expired_server=pair("expired-server", ca, "localhost", server=True, expired=True),
        client=client,
        client_encrypted_key=_write_key(
            directory / "client-encrypted.key", client_key, KEY_PASSPHRASE
        ),
        expired_client=pair("expired-client", ca, CLIENT_CN, server=False, expired=True),
        other_ca_client=pair("other-ca-client", other, CLIENT_CN, server=False),
        ca_and_other_ca=_write_cert(directory / "both-cas.crt", ca.cert, other.cert),
    )
