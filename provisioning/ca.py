"""The deployment's own certificate authority and the certificates it issues.

::

    DIR/tls/ca.crt       the CA certificate: every client trusts the broker through it
    DIR/tls/ca.key       the CA's private key (mode 0600): keep it on the server machine, or offline
    DIR/tls/broker.crt   the broker's certificate (its key broker.key, mode 0600)
    DIR/tls/server.crt   the server's certificate (its key server.key, mode 0600): for the console
                         over HTTPS (``[console] tls_cert_file``) or as an MQTT client certificate

Keys are ECDSA on P-256 (Mosquitto 2.0.11 on OpenSSL 3 serves it over TLS 1.2 and 1.3; verified
by the TLS tests), signatures SHA-256. Validity: the CA 10 years
(:data:`CA_VALID_DAYS`), the certificates it issues 825 days (:data:`LEAF_VALID_DAYS`), each
back-dated one hour so a clock a little behind still accepts them.

A private key is written to a file created with mode 0600 before any byte goes in, and is never
logged or printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.settings import ConfigError

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 825
_BACKDATE = dt.timedelta(hours=1)
CA_CERT = "ca.crt"
CA_KEY = "ca.key"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that is mode 0600 from its creation on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        host = host.strip()
        if not host or host in seen or host in {"0.0.0.0", "::"}:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            try:
                names.append(x509.DNSName(host))
            except (ValueError, UnicodeError) as exc:
                raise ConfigError(f"{host!r} cannot be named in a certificate: {exc}") from None
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files."""

    cert: Path
    key: Path


class CertificateAuthority:
    """A CA whose certificate and key live in ``directory`` (``ca.crt``, ``ca.key``)."""

    def __init__(self, directory: Path, cert: x509.Certificate,
                 key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self._cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def create(cls, directory: Path, name: str, *, days: int = CA_VALID_DAYS) -> CertificateAuthority:
        """A new CA in ``directory`` (refused if one is there already)."""
        if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
            raise ConfigError(f"{directory} already holds a certificate authority")
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "alarmpost CA"),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "alarmpost")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        write_private(directory / CA_KEY, _key_pem(key))
        (directory / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except FileNotFoundError as exc:
            raise ConfigError(f"{exc.filename} is missing: this deployment has no certificate "
                              "authority") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{directory / CA_KEY} is not an EC private key")
        return cls(directory, cert, key)

    def issue(self, common_name: str, *, hosts: Iterable[str] = (), cert_path: Path,
              key_path: Path, server: bool = True, client: bool = False,
              days: int = LEAF_VALID_DAYS) -> Issued:
        """A certificate for ``common_name`` naming ``hosts`` (IP addresses or DNS names) as its
        subject alternative names; ``server``/``client`` choose its extended key usage."""
        if not server and not client:
            raise ValueError("a certificate must be for a server, a client or both")
        key = _new_key()
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + dt.timedelta(days=days), self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        san = _san(hosts)
        if len(san):
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_path, key_path)


def local_names(*hosts: str) -> list[str]:
    """``hosts`` plus the names a client on the same machine uses (127.0.0.1, ::1, localhost)."""
    return [*hosts, "127.0.0.1", "::1", "localhost"]
