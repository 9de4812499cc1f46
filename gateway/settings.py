"""Gateway configuration from the environment (prefix ``AGENTPLEX_GATEWAY_``)."""

from __future__ import annotations

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
        return GatewayOptions(
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            default_agent=self.default_agent,
            cors_origins=tuple(o.strip() for o in self.cors_origins.split(",") if o.strip()),
            max_request_bytes=self.max_request_bytes,
            rate_limit_per_second=self.rate_limit_per_second,
            rate_limit_burst=self.rate_limit_burst,
            unary_timeout_seconds=self.unary_timeout_seconds,
            stream_idle_timeout_seconds=self.stream_idle_timeout_seconds,
            health_check_interval_seconds=self.health_check_interval_seconds,
            console=self.console,
            access_log=self.access_log,
        )
