"""Gateway configuration from the environment (prefix ``AGENTPLEX_GATEWAY_``)."""

from __future__ import annotations

import dataclasses

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentplex.gateway.resources import GatewayOptions


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTPLEX_GATEWAY_", extra="ignore")

    # Where Envoy listens for callers (gRPC, gRPC-Web, JSON and the console, one port).
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8080, ge=0, le=65535)
    # The agent a gRPC call without an x-agentplex-agent header reaches.
    default_agent: str = "assistant"
    # Browser origins other than the gateway's own that may call it (CORS), comma-separated.
    cors_origins: str = ""
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    rate_limit_per_second: int = Field(default=1000, ge=1)
    rate_limit_burst: int = Field(default=2000, ge=1)
    unary_timeout_seconds: float = Field(default=330.0, gt=0)
    stream_idle_timeout_seconds: float = Field(default=300.0, gt=0)
    health_check_interval_seconds: float = Field(default=1.0, gt=0)
    # How often the control plane re-reads the agent directory (routes follow within ~2 polls).
    directory_poll_seconds: float = Field(default=0.5, gt=0)
    console: bool = True
    access_log: bool = True

    def options(self) -> GatewayOptions:
        """The edge policy: every setting that names a GatewayOptions field, as is."""
        shared = {f.name for f in dataclasses.fields(GatewayOptions)} & set(type(self).model_fields)
        values = self.model_dump(include=shared)
        values["cors_origins"] = tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())
        return GatewayOptions(**values)
