"""A throw-away lab CA and server certificate so TLS works without any outside PKI.

EC P-256 keys, SHA-256 signatures and the extensions strict verifiers ask for (key
identifiers, key usage, serverAuth), so Python's ssl, paho and mosquitto's clients accept them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_MIN_REMAINING = dt.timedelta(days=1)  # reissue rather than hand out a cert about to expire


@dataclass(frozen=True)
class CertPaths:
    """Where the lab PKI files are; ``ca_key`` lets later runs issue more certificates."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: Path


def _paths(out_dir: Path) -> CertPaths:
    return CertPaths(
        ca_cert=out_dir / "ca.crt",
        server_cert=out_dir / "server.crt",
        server_key=out_dir / "server.key",
        ca_key=out_dir / "ca.key",
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; private keys are created 0600 so they are never world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, 0o600 if private else 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _issue(
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    ca: bool = False,
    hosts: Sequence[str] = (),
    eku: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """Build one certificate; ``issuer=None`` means self-signed (the CA)."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qmig lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _validity(cert: x509.Certificate) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) as aware datetimes on cryptography 41 as well as newer."""
    if hasattr(cert, "not_valid_after_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    return (  # pragma: no cover - cryptography < 42
        cert.not_valid_before.replace(tzinfo=dt.UTC),
        cert.not_valid_after.replace(tzinfo=dt.UTC),
    )


def _still_valid(cert: x509.Certificate) -> bool:
    not_before, not_after = _validity(cert)
    now = _now()
    return not_before <= now and not_after - now > _MIN_REMAINING


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _covers_hosts(cert: x509.Certificate, hosts: Sequence[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(_san_entries(hosts)) <= set(san)


def _load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert, key = _load_cert(paths.ca_cert), _load_key(paths.ca_key)
    if cert is None or key is None or not _still_valid(cert) or not _same_key(cert, key):
        return None
    return cert, key


def _server_ok(paths: CertPaths, ca: x509.Certificate, hosts: Sequence[str]) -> bool:
    cert, key = _load_cert(paths.server_cert), _load_key(paths.server_key)
    return (
        cert is not None
        and key is not None
        and _still_valid(cert)
        and _same_key(cert, key)
        and _signed_by(cert, ca)
        and _covers_hosts(cert, hosts)
    )


def make_lab_certs(
    out_dir: Path | str,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 825,
    overwrite: bool = False,
) -> CertPaths:
    """Create (or keep) ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` in ``out_dir``.

    Without ``overwrite`` valid existing files are kept, and a still-valid CA is reused when only
    the server certificate must be reissued, so clients that already trust the CA keep working.
    """
    if not hosts:
        raise ValueError("make_lab_certs needs at least one host name or address")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(out)
    loaded = None if overwrite else _load_ca(paths)
    if loaded is not None and _server_ok(paths, loaded[0], hosts):
        return paths
    if loaded is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue("qmig lab CA", ca_key.public_key(), None, ca_key, days, ca=True)
        _write(paths.ca_key, _key_pem(ca_key), private=True)
        _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    else:
        ca_cert, ca_key = loaded
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        hosts[0],
        server_key.public_key(),
        ca_cert,
        ca_key,
        days,
        hosts=hosts,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def issue_client_cert(paths: CertPaths, name: str, days: int = 825) -> tuple[Path, Path]:
    """Issue ``NAME.crt``/``NAME.key`` (clientAuth) from the lab CA, for require_certificate."""
    return _issue_leaf(paths, name, days, (), ExtendedKeyUsageOID.CLIENT_AUTH)


def issue_server_cert(
    paths: CertPaths, name: str, hosts: Sequence[str], days: int = 825
) -> tuple[Path, Path]:
    """Issue ``NAME.crt``/``NAME.key`` (serverAuth, for ``hosts``) from the lab CA: one
    server's own certificate, when several servers trust the same CA."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    return _issue_leaf(paths, name, days, hosts, ExtendedKeyUsageOID.SERVER_AUTH)


def _issue_leaf(
    paths: CertPaths, name: str, days: int, hosts: Sequence[str], eku: x509.ObjectIdentifier
) -> tuple[Path, Path]:
    loaded = _load_ca(paths)
    if loaded is None:
        raise ValueError(f"no usable lab CA in {paths.ca_cert.parent}; run make_lab_certs first")
    ca_cert, ca_key = loaded
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(name, key.public_key(), ca_cert, ca_key, days, hosts=hosts, eku=eku)
    out = paths.ca_cert.parent
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path
