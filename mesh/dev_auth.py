"""The development issuer `agentplex up` runs the gateway with (unless `--no-auth`).

No identity provider is needed on one machine: `up` keeps a signing key of its
own under `.agentplex/auth/` (made once, kept across runs, so tokens minted
earlier stay valid), gives the gateway its public half as a JWKS file, and
`agentplex token` mints bearer tokens with it for grpcurl, curl and scripts.
With a real OIDC issuer none of this runs: set the `gateway_jwt_*` settings
(docs/SECURITY.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agentplex.contract import scopes

ISSUER = "agentplex-dev"
AUDIENCE = "agentplex"
# What `agentplex token` grants unless told otherwise (an ordinary caller's scopes),
# and what `--admin` adds: the contract's own lists, so tokens and services agree.
DEFAULT_SCOPES = scopes.DEFAULT_SCOPES
ADMIN_SCOPES = scopes.ADMIN_SCOPES


@dataclass(frozen=True)
class DevIssuer:
    key_file: Path
    jwks_file: Path

    def gateway_env(self) -> dict[str, str]:
        """The control plane's settings for this issuer."""
        return {
            "AGENTPLEX_GATEWAY_AUTH": "jwt",
            "AGENTPLEX_GATEWAY_JWT_ISSUER": ISSUER,
            "AGENTPLEX_GATEWAY_JWT_AUDIENCES": AUDIENCE,
            "AGENTPLEX_GATEWAY_JWKS_FILE": str(self.jwks_file),
        }

    def state(self) -> dict[str, str]:
        """Where `agentplex token` finds the key (the state file's `auth`)."""
        return {"issuer": ISSUER, "audience": AUDIENCE, "key": str(self.key_file)}


def ensure_issuer(directory: Path) -> DevIssuer:
    """The issuer under `directory`, its key made on first use."""
    from agentplex.gateway import tokens  # PyJWT and cryptography: only when signing

    key_file = directory / tokens.KEY_FILE
    if key_file.exists():
        key = tokens.load_signing_key(key_file)
    else:
        key = tokens.generate_signing_key()
    key_path, jwks_path = tokens.write_signing_key(key, directory)
    # Absolute: the state file is read from wherever a command runs.
    return DevIssuer(key_path.resolve(), jwks_path.resolve())
