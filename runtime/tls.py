"""Service-to-service mTLS: the mesh CA, a certificate per service identity, credentials.

An identity is what a process is (`memory`, `registry`, `tools`, `agent`,
`worker`, `gateway-control-plane`, `gateway`, `cli`), not where it runs: every
replica of a part shares one. A leaf certificate carries it twice: as the URI
SAN `spiffe://agentplex/<identity>`, which servers authorize callers by
(`runtime/peer_auth.py`), and as a DNS SAN, which clients verify servers by
(`open_channel(..., server_identity=...)` sets gRPC's target name override to it:
grpcio's Python API has no hook to verify a URI SAN, and addresses are pod IPs
that a shared certificate cannot list). Further DNS and IP SANs (`localhost`,
Service names, `127.0.0.1`) let a client that names no identity verify the
address it dialled, the ordinary way.

`create_mesh_pki` writes a CA and leaves for development and tests (`python -m
agentplex.runtime.tls DIR IDENTITY...`); production mounts them (Kubernetes
Secrets) and points the `tls_*_file` settings at them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentplex.runtime.settings import Settings

SPIFFE_TRUST_DOMAIN = "agentplex"
SPIFFE_PREFIX = f"spiffe://{SPIFFE_TRUST_DOMAIN}/"
CA_FILE = "ca.pem"
# Leaves are reissued far more often than the CA; a year keeps a dev mesh working.
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
# Tolerates clocks a little behind the issuer's.
BACKDATE = datetime.timedelta(minutes=5)
DEFAULT_DNS_NAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1", "::1")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def spiffe_id(identity: str) -> str:
    return SPIFFE_PREFIX + identity


def identity_from_sans(sans: Iterable[str]) -> str | None:
    """The mesh identity among a certificate's SANs (as gRPC lists them), if any."""
    for san in sans:
        if san.startswith(SPIFFE_PREFIX) and "/" not in san[len(SPIFFE_PREFIX) :]:
            return san[len(SPIFFE_PREFIX) :] or None
    return None


def cert_file(directory: Path, identity: str) -> Path:
    return directory / f"{identity}.pem"


def key_file(directory: Path, identity: str) -> Path:
    return directory / f"{identity}-key.pem"


def _check_identity(identity: str) -> None:
    # A DNS label too: the certificate carries it as a DNS SAN.
    if not _DNS_LABEL.fullmatch(identity):
        raise ValueError(f"a mesh identity is a lowercase DNS label: {identity!r}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600, never world-readable for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    path.chmod(0o600)


def create_mesh_pki(
    directory: Path,
    identities: Sequence[str],
    *,
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
    now: datetime.datetime | None = None,
) -> None:
    """Write `ca.pem` and `<identity>.pem` / `<identity>-key.pem` for each identity.

    EC P-256 keys; the CA's key is not kept (a new leaf means a new PKI, which
    suits development and tests; production issues leaves from its own CA).
    Blocking: call it from a thread in a running loop.
    """
    for identity in identities:
        _check_identity(identity)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    start = (now or datetime.datetime.now(datetime.UTC)) - BACKDATE
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentplex mesh CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ips = [ipaddress.ip_address(ip) for ip in ip_addresses]
    for identity in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_id(identity)),
            *(x509.DNSName(name) for name in dict.fromkeys([identity, *dns_names])),
            *(x509.IPAddress(ip) for ip in ips),
        ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            # Every part is both a server and a client of others.
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_file(directory, identity).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_file(directory, identity), _key_pem(key))


def certificate_identity(cert_pem: bytes) -> str | None:
    """The mesh identity a PEM certificate (the first in a chain) carries."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return identity_from_sans(san.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True)
class TlsFiles:
    """Where a process's CA, certificate and key are: the `tls_*_file` settings."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """None when mTLS is off (settings ensure the three are set together)."""
        ca, cert, key = settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
        if ca is None or cert is None or key is None:
            return None
        return cls(ca, cert, key)

    @classmethod
    def for_identity(cls, directory: Path, identity: str) -> TlsFiles:
        """The files `create_mesh_pki` wrote for `identity`."""
        return cls(
            directory / CA_FILE, cert_file(directory, identity), key_file(directory, identity)
        )

    def read(self) -> MeshTls:
        """Blocking: at start, or through `load`."""
        cert = self.cert.read_bytes()
        identity = certificate_identity(cert)
        if identity is None:
            raise ValueError(f"{self.cert} carries no {SPIFFE_PREFIX}<identity> URI SAN")
        return MeshTls(
            ca=self.ca.read_bytes(), cert=cert, key=self.key.read_bytes(), identity=identity
        )

    async def load(self) -> MeshTls:
        return await asyncio.to_thread(self.read)


@dataclass(frozen=True)
class MeshTls:
    """One process's mesh credentials: the CA it trusts, its own certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes
    identity: str

    def server_credentials(self) -> grpc.ServerCredentials:
        """Only clients with a certificate from the mesh CA complete the handshake."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


async def load_mesh_tls(settings: Settings) -> MeshTls | None:
    """This process's mesh credentials, or None when mTLS is off."""
    files = TlsFiles.from_settings(settings)
    return None if files is None else await files.load()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agentplex.runtime.tls",
        description="Write a mesh CA and a certificate per identity (development and tests).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("identities", nargs="+")
    parser.add_argument(
        "--dns", action="append", default=None, help="a DNS SAN for every leaf (repeatable)"
    )
    parser.add_argument(
        "--ip", action="append", default=None, help="an IP SAN for every leaf (repeatable)"
    )
    args = parser.parse_args(argv)
    create_mesh_pki(
        args.directory,
        args.identities,
        dns_names=args.dns if args.dns is not None else DEFAULT_DNS_NAMES,
        ip_addresses=args.ip if args.ip is not None else DEFAULT_IP_ADDRESSES,
    )


if __name__ == "__main__":
    main()
