"""Development tokens for the gateway's edge authentication (`gateway_auth` = `jwt`).

A signing key of our own, its public half as a JWKS for the gateway
(`gateway_jwks_file`), and bearer tokens signed with it: what a local mesh needs
when no identity provider is at hand. With a real OIDC issuer none of this is
used: the issuer signs the tokens and publishes its keys (`gateway_jwks_uri`).

Here, not in `runtime/`: only the gateway checks tokens, and the command line
(which may import the gateway) mints them; the services read the principal
the edge verified, never a token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

Algorithm = Literal["EdDSA", "ES256"]
ALGORITHMS: tuple[Algorithm, ...] = ("EdDSA", "ES256")
# The claim that names the caller's tenant (the principal's, with `sub` and `scope`).
TENANT_CLAIM = "tenant"
DEFAULT_TTL_SECONDS = 3600
KEY_FILE = "signing-key.pem"
JWKS_FILE = "jwks.json"

_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs tokens, with the key id its tokens name (`kid`)."""

    algorithm: Algorithm
    private_key: _PrivateKey

    @property
    def kid(self) -> str:
        """The public key's RFC 7638 thumbprint: stable, and the same wherever computed."""
        jwk = self.public_jwk()
        required = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("crv", "kty", "x", "y")
        canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def public_jwk(self) -> dict[str, Any]:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            jwk = OKPAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        assert isinstance(jwk, dict)
        return dict(jwk)

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWKS, as `gateway_jwks_file` wants it."""
        jwk = self.public_jwk()
        jwk.update(kid=self.kid, alg=self.algorithm, use="sig")
        return {"keys": [jwk]}

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def generate_signing_key(algorithm: Algorithm = "EdDSA") -> SigningKey:
    """A new key: Ed25519 (EdDSA) by default, or P-256 (ES256)."""
    if algorithm == "EdDSA":
        return SigningKey(algorithm, ed25519.Ed25519PrivateKey.generate())
    if algorithm == "ES256":
        return SigningKey(algorithm, ec.generate_private_key(ec.SECP256R1()))
    raise ValueError(f"signing algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")


def load_signing_key(path: Path) -> SigningKey:
    """A key written by `write_signing_key` (PKCS#8 PEM, unencrypted)."""
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return SigningKey("EdDSA", private_key)
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return SigningKey("ES256", private_key)
    raise ValueError(f"{path} holds neither an Ed25519 nor a P-256 private key")


def write_signing_key(key: SigningKey, directory: Path) -> tuple[Path, Path]:
    """Writes the private key and its JWKS into `directory` (created, 0700 if new), each
    file readable by its owner only; returns (key file, JWKS file).

    Each file is replaced whole, so a reader (the gateway watches its JWKS file) never
    sees one half-written."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, jwks_path = directory / KEY_FILE, directory / JWKS_FILE
    _write_private(key_path, key.private_pem())
    _write_private(jwks_path, (json.dumps(key.jwks(), indent=2) + "\n").encode())
    return key_path, jwks_path


def _write_private(path: Path, content: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    # Created 0600 (never briefly readable by others), whatever the umask.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def mint(
    key: SigningKey,
    *,
    issuer: str,
    audience: str | Iterable[str],
    subject: str,
    tenant: str,
    scopes: Iterable[str] = (),
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    now: float | None = None,
    not_before: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A signed bearer token (a JWT): `iss`, `aud`, `sub`, `tenant`, `scope` (the scopes,
    space-separated, as OAuth 2 writes them), `iat`, `nbf`, `exp` and a unique `jti`."""
    if ttl_seconds <= 0:
        raise ValueError("a token's lifetime must be positive")
    issued = int(time.time() if now is None else now)
    audiences = [audience] if isinstance(audience, str) else list(audience)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audiences[0] if len(audiences) == 1 else audiences,
        "sub": subject,
        TENANT_CLAIM: tenant,
        "scope": " ".join(scopes),
        "iat": issued,
        "nbf": int(issued if not_before is None else not_before),
        "exp": int(issued + ttl_seconds),
        "jti": uuid.uuid4().hex,
        **(extra or {}),
    }
    return jwt.encode(
        claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "JWT"}
    )
