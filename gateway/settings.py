"""The gateway's settings under their short names: the control plane's edge policy.

Not read from the environment here: they are `Settings`' gateway section
(``AGENTPLEX_GATEWAY_LISTEN_PORT`` is ``Settings.gateway_listen_port``, documented
in docs/SETTINGS.md), taken over by `from_settings`. Built directly (tests, the
bench), an unset field takes that section's default, so defaults live in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from agentplex.gateway.resources import GatewayOptions, JwtOptions
from agentplex.runtime.clients import Keepalive
from agentplex.runtime.settings import GatewaySection, Settings, check_gateway_auth

PREFIX = "gateway_"


def _default(name: str) -> Any:
    return GatewaySection.model_fields[PREFIX + name].get_default(call_default_factory=True)


class GatewaySettings(BaseModel):
    """Settings' gateway section, one field per `gateway_*` setting without the prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen_host: str = _default("listen_host")
    listen_port: int = _default("listen_port")
    control_plane_address: str = _default("control_plane_address")
    admin_port: int = _default("admin_port")
    stats_port: int | None = _default("stats_port")
    default_agent: str = _default("default_agent")
    cors_origins: str = _default("cors_origins")
    max_request_bytes: int = _default("max_request_bytes")
    rate_limit_per_second: int = _default("rate_limit_per_second")
    rate_limit_burst: int = _default("rate_limit_burst")
    tenant_rate_limit_per_second: int = _default("tenant_rate_limit_per_second")
    tenant_rate_limit_burst: int = _default("tenant_rate_limit_burst")
    unary_timeout_seconds: float = _default("unary_timeout_seconds")
    stream_idle_timeout_seconds: float = _default("stream_idle_timeout_seconds")
    health_check_interval_seconds: float = _default("health_check_interval_seconds")
    directory_poll_seconds: float = _default("directory_poll_seconds")
    console: bool = _default("console")
    access_log: bool = _default("access_log")
    auth: Literal["none", "jwt"] = _default("auth")
    allow_unauthenticated: bool = _default("allow_unauthenticated")
    jwt_issuer: str = _default("jwt_issuer")
    jwt_audiences: str = _default("jwt_audiences")
    jwks_uri: str | None = _default("jwks_uri")
    jwks_file: Path | None = _default("jwks_file")
    jwks_cache_seconds: int = _default("jwks_cache_seconds")
    jwks_ca_file: Path = _default("jwks_ca_file")
    # The mesh's audit file (`Settings.audit_log_file`, not a gateway setting: the services
    # append to it too), taken over by `from_settings` for the edge's audit lines.
    _audit_log_file: Path | None = PrivateAttr(default=None)

    @field_validator("jwks_uri", "jwks_file", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return value or None

    @model_validator(mode="after")
    def _auth_is_complete(self) -> GatewaySettings:
        check_gateway_auth(
            self.auth,
            issuer=self.jwt_issuer,
            audiences=self.jwt_audiences,
            jwks_uri=self.jwks_uri,
            jwks_file=self.jwks_file,
        )
        return self

    def open_to_anyone(self) -> str | None:
        """Why this gateway must not start (it would take calls from other machines and
        check no one), or None. The control plane and `agentplex up` both refuse it."""
        if self.auth != "none" or self.allow_unauthenticated or _is_loopback(self.listen_host):
            return None
        return (
            f"the gateway would listen on {self.listen_host} and check no tokens: set "
            "AGENTPLEX_GATEWAY_AUTH=jwt (docs/SECURITY.md; agentplex up does by default), "
            "listen on 127.0.0.1, or say AGENTPLEX_GATEWAY_ALLOW_UNAUTHENTICATED=true"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewaySettings:
        """The gateway section of `settings`, as read once by the process, and the mesh's
        audit file."""
        gateway = cls(**{name: getattr(settings, PREFIX + name) for name in cls.model_fields})
        gateway._audit_log_file = settings.audit_log_file
        return gateway

    def options(
        self,
        keepalive: Keepalive | None = None,
        jwks: str | None = None,
        *,
        audit_log_file: Path | None = None,
    ) -> GatewayOptions:
        """The edge policy: every setting that names a GatewayOptions field, as is, and the
        mesh-wide keepalive (`Keepalive.from_settings`) for Envoy's upstream connections.

        With `auth` `jwt` and a `jwks_file`, `jwks` is that file's content (the caller
        reads it: this stays free of I/O). The edge's audit lines go to `audit_log_file`,
        or else the mesh's audit file `from_settings` took over, or else Envoy's stdout."""
        shared = {f.name for f in dataclasses.fields(GatewayOptions)} & set(type(self).model_fields)
        values = self.model_dump(include=shared)
        values["cors_origins"] = tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())
        if keepalive is not None:
            values["keepalive_seconds"] = keepalive.seconds
            values["keepalive_timeout_seconds"] = keepalive.timeout_seconds
        values["jwt"] = self.jwt_options(jwks)
        audit = audit_log_file or self._audit_log_file
        # Envoy opens the file itself, maybe from another working directory.
        values["audit_log_file"] = str(audit.absolute()) if audit is not None else None
        return GatewayOptions(**values)

    def jwt_options(self, jwks: str | None = None) -> JwtOptions | None:
        """What Envoy checks tokens against; None with `auth` `none`."""
        if self.auth != "jwt":
            return None
        if self.jwks_file is not None and jwks is None:
            raise ValueError(f"the JWKS of {self.jwks_file} must be read and passed in")
        return JwtOptions(
            issuer=self.jwt_issuer.strip(),
            audiences=tuple(a.strip() for a in self.jwt_audiences.split(",") if a.strip()),
            jwks_uri=self.jwks_uri,
            jwks=jwks if self.jwks_file is not None else None,
            jwks_cache_seconds=self.jwks_cache_seconds,
            jwks_ca_file=str(self.jwks_ca_file),
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
