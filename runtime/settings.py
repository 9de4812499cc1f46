"""Typed configuration, read once from the environment (prefix ``AGENTPLEX_``).

This class is the only place any agentplex process reads its configuration
from the environment: every process main builds one `Settings` at start and
passes it down. The launcher passes addresses on to its children through the
environment, so a service started by hand and one started by ``agentplex up``
behave the same.

The fields are grouped into one section per part of the mesh (a base class
each; `Settings` is all of them, flat: ``settings.redis_url``). Every field
has a ``description``: docs/SETTINGS.md is generated from them
(``python -m agentplex.runtime.settings_doc``), so say there what a setting
is for, not here.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agentplex.runtime.principal import TENANT_PATTERN

ENV_PREFIX = "AGENTPLEX_"
# json_schema_extra key of a field that also honours a standard variable (REDIS_URL).
STANDARD_VARIABLE = "standard_variable"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
GATEWAY_AUTH_MODES = ("none", "jwt")


class Section(BaseModel):
    """One part's settings. The first docstring line is its title in docs/SETTINGS.md."""


class SharedSection(Section):
    """Shared.

    Read by every process of the mesh.
    """

    host: str = Field(
        default="127.0.0.1",
        description="Interface every server binds: gRPC, metrics and the gateway's control plane.",
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="gRPC port of a part started alone (`agentplex serve PART`; a worker and the "
        "gateway's control plane too); `--port` wins, 0 is any free port. `agentplex up` gives "
        "each part its own.",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the part's Prometheus `/metrics` (`--metrics-port` wins; 0 is any "
        "free port).",
    )
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="A plaintext port serving grpc.health.v1 only (no services, no reflection), "
        "for probes that cannot present a mesh certificate: the kubelet's gRPC probes when mTLS "
        "is on. Unset: none.",
    )
    advertise_host: str | None = Field(
        default=None,
        description="The IP address others reach this part at, published to the registry "
        "(agents and tool backends) and routed to by the gateway: in Kubernetes the pod IP "
        "(`status.podIP`). Unset: `host`, or when that is a wildcard (`0.0.0.0`, `::`), the "
        "address this machine's hostname resolves to.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis that holds sessions, the registry, task queues and task events.",
    )
    key_prefix: str = Field(
        default="agentplex",
        description="Namespaces every Redis key, so several meshes (or tests) can share one Redis.",
    )
    memory_address: str = Field(
        default="127.0.0.1:50051",
        description="Where agents reach the Memory service "
        "(`agentplex up` sets it to the bound one).",
    )
    registry_address: str = Field(
        default="127.0.0.1:50052",
        description="Where agents, tool backends and the gateway reach the Tool Registry "
        "(`agentplex up` sets it to the bound one).",
    )
    grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a stopping server lets in-flight calls (and a worker its running "
        "tasks) finish after SIGTERM.",
    )
    drain_seconds: float = Field(
        default=3.0,
        ge=0,
        le=300,
        description="After SIGTERM, how long a server keeps answering while its health says "
        "NOT_SERVING, so the gateway's health checks (the next one ejects the replica) and "
        "clients' balancers move away before it stops accepting calls; then `grace_seconds` "
        "apply. 0 stops at once (development, tests).",
    )
    health_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often a service re-checks its dependencies for its health status.",
    )
    keepalive_seconds: float = Field(
        default=10.0,
        ge=1,
        description="How often internal gRPC channels, servers and the gateway's upstream "
        "connections send an HTTP/2 PING to prove the peer is alive.",
    )
    keepalive_timeout_seconds: float = Field(
        default=10.0,
        ge=1,
        description="How long a PING may go unanswered before the connection counts as dead and "
        "its calls fail with UNAVAILABLE: a frozen or half-open peer is detected within "
        "`keepalive_seconds` + this.",
    )
    log_level: str = Field(
        default="INFO", description="Level of the JSON log lines every process writes to stderr."
    )
    audit_log_file: Path | None = Field(
        default=None,
        description="append the audit trail (admin actions, refused requests) as JSON lines to "
        "this file",
    )
    trace_exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="Where finished spans go: `otlp` sends them over OTLP/gRPC to a collector "
        "(see `otel_exporter_otlp_endpoint`), `console` prints them as JSON to stderr, `none` "
        "records no spans (trace ids still reach the logs and downstream calls). "
        "`AGENTPLEX_TRACE_EXPORTER` wins over `OTEL_TRACES_EXPORTER`; unlike the SDK's, the "
        "default is `none`.",
        json_schema_extra={STANDARD_VARIABLE: "OTEL_TRACES_EXPORTER"},
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        description="The OTLP/gRPC receiver spans go to with `trace_exporter=otlp` (unset: "
        "`http://localhost:4317`); `http://` means plaintext. Headers, certificates, timeout and "
        "compression: the SDK's own `OTEL_EXPORTER_OTLP_*` variables.",
        json_schema_extra={STANDARD_VARIABLE: "OTEL_EXPORTER_OTLP_ENDPOINT"},
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None,
        description="The receiver for spans only; wins over `otel_exporter_otlp_endpoint`.",
        json_schema_extra={STANDARD_VARIABLE: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"},
    )
    otel_service_name: str | None = Field(
        default=None,
        description="`service.name` of every span this process exports (unset: the part's own "
        "name, such as `memory` or `assistant-worker`; the `agentplex.part` attribute always "
        "names the part).",
        json_schema_extra={STANDARD_VARIABLE: "OTEL_SERVICE_NAME"},
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="Event loop of every process: `auto` is uvloop when installed, else the "
        "standard loop; `asyncio` asks for the standard loop.",
    )

    @field_validator("trace_exporter", mode="before")
    @classmethod
    def _exporter_name(cls, value: object) -> object:
        # OTEL_TRACES_EXPORTER may list several; one exporter per process here.
        if not isinstance(value, str):
            return value
        wanted = value.strip().lower() or "none"
        if "," in wanted:
            raise ValueError(f"one trace exporter (otlp, console or none), not {wanted!r}")
        return wanted

    @field_validator(
        "otel_exporter_otlp_endpoint",
        "otel_exporter_otlp_traces_endpoint",
        "otel_service_name",
        mode="before",
    )
    @classmethod
    def _blank_is_default(cls, value: object) -> object:
        return value or None

    def otlp_traces_endpoint(self) -> str | None:
        """Where `otlp` sends spans: the traces endpoint, else the shared one."""
        return self.otel_exporter_otlp_traces_endpoint or self.otel_exporter_otlp_endpoint

    @field_validator("event_loop", mode="before")
    @classmethod
    def _loop_name(cls, value: object) -> object:
        # Forgiving about case and blanks, strict about the name (one line saying which).
        if not isinstance(value, str):
            return value
        wanted = value.strip().lower() or "auto"
        if wanted not in EVENT_LOOPS:
            choices = ", ".join(EVENT_LOOPS[:-1]) + f" or {EVENT_LOOPS[-1]}"
            raise ValueError(f"AGENTPLEX_EVENT_LOOP must be {choices}, not {wanted!r}")
        return wanted


class MemorySection(Section):
    """Memory.

    The Memory service (`python -m agentplex.memory`).
    """

    memory_ttl_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="How long a session's stored turns live after its last write.",
    )
    memory_default_context_tokens: int = Field(
        default=2048, ge=1, description="Token limit of a LoadContext call that sets none."
    )
    memory_max_messages: int = Field(
        default=1000,
        ge=2,
        description="Hard cap on stored turns per session; older ones are trimmed on append.",
    )


class RegistrySection(Section):
    """Registry and tools.

    The Tool Registry (`python -m agentplex.registry`) and the built-in tool
    backend (`python -m agentplex.tools`).
    """

    docs_dir: Path | None = Field(
        default=None,
        description="The documentation docs.search indexes: README.md and docs/**/*.md under "
        "this directory (unset: the documentation shipped with agentplex); `agentplex up` "
        "passes its own down.",
    )
    tool_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Deadline of one tool call the registry routes, when the caller sets none.",
    )
    idempotency_ttl_seconds: int = Field(
        default=24 * 3600,
        ge=1,
        description="How long the registry remembers an idempotency key's outcome.",
    )
    max_delegation_depth: int = Field(
        default=3, ge=0, description="Deepest sub-task delegation allowed (a root task is depth 0)."
    )
    breaker_failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive failures of one downstream agent that open its circuit breaker.",
    )
    breaker_reset_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long an open circuit breaker stays open before one probe call is let "
        "through.",
    )


class AgentsSection(Section):
    """Agents.

    Agent processes (`python -m agentplex.agents`) and their task workers.
    """

    llm_provider: Literal["scripted", "openai", "local"] = Field(
        default="scripted",
        description="The model agents call: `scripted` (built in, deterministic), `openai` (any "
        "OpenAI-compatible server), or `local` (`agentplex up` only: it starts SmolLM2-135M "
        "offline and points the agents at it as `openai`).",
    )
    openai_base_url: str = Field(
        default="http://127.0.0.1:8080/v1",
        description="Base URL of the OpenAI-compatible server, for `llm_provider=openai`.",
    )
    openai_api_key: SecretStr = Field(
        default=SecretStr(""), description="API key for that server; kept out of logs and reprs."
    )
    openai_model: str = Field(default="gpt-4o-mini", description="Model name sent to that server.")
    llm_timeout_seconds: float = Field(
        default=60.0, gt=0, description="Deadline of one model call."
    )
    scripted_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Simulated model latency of the scripted model, per call (demos, chaos runs).",
    )
    context_tokens: int = Field(
        default=2048,
        ge=64,
        description="Token limit of the memory packet loaded into each task's prompt.",
    )
    context_max_messages: int = Field(
        default=40,
        ge=2,
        description="Stored turns a session keeps verbatim; past this (or past `context_tokens`) "
        "the oldest are summarized by the agent's own model into Memory.",
    )
    context_summary_tokens: int = Field(
        default=256,
        ge=16,
        description="Upper bound of one summary, in tokens; at most half of `context_tokens` is "
        "used.",
    )
    tool_list_max_age_seconds: float = Field(
        default=1.0,
        ge=0,
        description="How long an agent process reuses the tool list it last read for new tasks "
        "(a tool call reporting a newer registry revision ends it sooner); 0: read it at the "
        "start of every task. The registry checks every call regardless.",
    )
    default_task_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Deadline applied to a task whose caller set none (every RPC has one).",
    )
    tenant_token_quota: int = Field(
        default=0,
        ge=0,
        description="Model tokens (prompt and completion, summaries included) each tenant's "
        "tasks may spend per `tenant_token_quota_period_seconds`, across every agent sharing "
        "this Redis and key prefix; 0 is unlimited. Checked before each model call: once a "
        "tenant's use reaches it, its tasks fail with RESOURCE_EXHAUSTED (QUOTA_EXHAUSTED) "
        "naming when the period resets. A call already running finishes, so use may pass the "
        "quota by what the tenant's calls in flight spend. The mesh acting for itself (no "
        "tenant) is never limited by this, only by a `default` entry in `tenant_token_quotas`.",
    )
    tenant_token_quota_period_seconds: int = Field(
        default=24 * 3600,
        ge=1,
        le=366 * 24 * 3600,
        description="Length of a token-quota period. Periods are fixed windows aligned to the "
        "Unix epoch (a day's starts at 00:00 UTC), and every tenant's use starts again at 0 "
        "when one begins.",
    )
    tenant_token_quotas: dict[str, int] = Field(
        default={},
        description="Per-tenant quotas that replace `tenant_token_quota`, as JSON: "
        '`{"acme": 2000000, "internal": 0}` (0: unlimited). A `default` entry also limits the '
        "mesh acting for itself.",
    )

    @field_validator("tenant_token_quotas")
    @classmethod
    def _tenant_quotas_are_valid(cls, value: dict[str, int]) -> dict[str, int]:
        """Refused at start, not at the first model call: a misspelt tenant name would
        otherwise leave that tenant quietly on the mesh-wide quota."""
        for tenant, tokens in value.items():
            if not TENANT_PATTERN.fullmatch(tenant):
                raise ValueError(
                    f"{tenant[:70]!r} is not a tenant name (1-64 letters, digits and ._-, "
                    "starting with a letter or digit)"
                )
            if tokens < 0:
                raise ValueError(f"the quota of {tenant!r} is {tokens}; it must be ≥ 0")
        return value


class TasksSection(Section):
    """Durable tasks.

    Task queues, their workers (`python -m agentplex.agents.worker`) and task events.
    """

    task_queue_limit: int = Field(
        default=1000,
        ge=1,
        description="Unfinished tasks an agent's queue accepts before SubmitTask says "
        "RESOURCE_EXHAUSTED.",
    )
    task_lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A worker silent this long is presumed dead and its task is reclaimed.",
    )
    task_max_attempts: int = Field(
        default=3, ge=1, description="Attempts that died before a task is dead-lettered."
    )
    task_event_retention_seconds: int = Field(
        default=24 * 3600,
        ge=1,
        description="How long a finished task's events stay watchable.",
    )
    task_record_ttl_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        description="How long a finished task's record stays readable.",
    )
    task_event_linger_seconds: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="How long a worker holds a task's first unwritten event so the next few share "
        "its Redis write (watchers see events up to this much later); 0: write at once.",
    )
    task_queue_gauge_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often each worker reads its agent's queue depth, oldest unclaimed "
        "task's wait and dead letters for its metrics (one Redis script).",
    )
    worker_concurrency: int = Field(
        default=4, ge=1, description="Tasks one worker process runs at once."
    )
    task_reconcile_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often the workers (one at a time, whichever holds the lock) reconcile "
        "task records with the queue: re-enqueue a pending or running task that lost its queue "
        "entry and has no live lease, and recount the queue depth.",
    )


class GatewaySection(Section):
    """Gateway.

    The gateway's control plane (`python -m agentplex.gateway`), which
    configures Envoy over xDS; these fields are its edge policy.
    """

    gateway_listen_host: str = Field(
        default="127.0.0.1",
        description="Where Envoy listens for callers (gRPC, gRPC-Web, JSON and the console, one "
        "port).",
    )
    gateway_listen_port: int = Field(
        default=8080, ge=0, le=65535, description="Envoy's listener port (0: any free port)."
    )
    gateway_control_plane_address: str = Field(
        default="127.0.0.1:50070",
        description="Where Envoy (`agentplex serve envoy`) reaches the gateway's control plane "
        "for its configuration (xDS) and the JSON body check; a DNS name or an IP.",
    )
    gateway_admin_port: int = Field(
        default=9901,
        ge=0,
        le=65535,
        description="Port of Envoy's admin API, on 127.0.0.1 only: it can stop Envoy "
        "(0: any free port).",
    )
    gateway_stats_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="With `agentplex serve envoy`, a listener on `gateway_listen_host` that "
        "serves only Envoy's Prometheus stats (`/stats/prometheus`), for scraping from other "
        "hosts; unset, the stats are only on the loopback admin API.",
    )
    gateway_default_agent: str = Field(
        default="assistant",
        description="The agent a gRPC call without an x-agentplex-agent header reaches.",
    )
    gateway_cors_origins: str = Field(
        default="",
        description="Browser origins other than the gateway's own that may call it (CORS), "
        "comma-separated.",
    )
    gateway_max_request_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest request body the gateway accepts."
    )
    gateway_rate_limit_per_second: int = Field(
        default=1000, ge=1, description="Requests per second the gateway admits (token refill)."
    )
    gateway_rate_limit_burst: int = Field(
        default=2000, ge=1, description="Requests the gateway admits at once (token bucket size)."
    )
    gateway_tenant_rate_limit_per_second: int = Field(
        default=100,
        ge=0,
        description="With `gateway_auth` `jwt`: requests per second the gateway admits for one "
        "tenant (the token's `tenant` claim; token refill), within the gateway-wide limit. "
        "Over it a tenant's calls get RESOURCE_EXHAUSTED (429 over JSON) while other tenants' "
        "pass. Each Envoy keeps its own buckets. 0: no per-tenant limit.",
    )
    gateway_tenant_rate_limit_burst: int = Field(
        default=200,
        ge=0,
        description="With `gateway_auth` `jwt`: requests one tenant may make at once (its token "
        "bucket size); 0: `gateway_tenant_rate_limit_per_second`.",
    )
    gateway_unary_timeout_seconds: float = Field(
        default=330.0, gt=0, description="Deadline of a unary call at the edge."
    )
    gateway_stream_idle_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a stream may stay silent before the gateway ends it.",
    )
    gateway_health_check_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often Envoy health-checks each agent replica. A replica that answers "
        "NOT_SERVING (stopping, or its dependencies down) leaves the rotation at the next check; "
        "one that does not answer, after two checks in a row. Two intervals must fit in "
        "`drain_seconds`, or the gateway warns.",
    )
    gateway_directory_poll_seconds: float = Field(
        default=0.5,
        gt=0,
        description="How often the control plane re-reads the agent directory (routes follow "
        "within about two polls).",
    )
    gateway_console: bool = Field(
        default=True, description="Serve the browser console at /console/."
    )
    gateway_access_log: bool = Field(
        default=True, description="Write Envoy's access log, one line per request."
    )
    gateway_auth: Literal["none", "jwt"] = Field(
        default="none",
        description="Who may call through the gateway: `none` (anyone who reaches it) or `jwt` "
        "(a bearer token in `Authorization`, verified by Envoy against `gateway_jwt_issuer`, "
        "`gateway_jwt_audiences` and the JWKS; `/health`, `/ready` and the console stay open). "
        "With `jwt`, set exactly one of `gateway_jwks_uri` and `gateway_jwks_file`.",
    )
    gateway_allow_unauthenticated: bool = Field(
        default=False,
        description="Let a gateway with `gateway_auth` `none` listen beyond loopback "
        "(`gateway_listen_host`); without it the control plane (and `agentplex up`) refuses "
        "to start such a gateway. For a network you fully trust, e.g. a development cluster "
        "reached only through `kubectl port-forward`.",
    )
    gateway_jwt_issuer: str = Field(
        default="",
        description="With `gateway_auth` `jwt`: the `iss` every token must carry.",
    )
    gateway_jwt_audiences: str = Field(
        default="",
        description="With `gateway_auth` `jwt`: the `aud` values accepted, comma-separated "
        "(a token must name one of them).",
    )
    gateway_jwks_uri: str | None = Field(
        default=None,
        description="The issuer's public keys (its JWKS, `http(s)://host[:port]/path`, e.g. an "
        "OIDC provider's `jwks_uri`), fetched and cached by Envoy.",
    )
    gateway_jwks_file: Path | None = Field(
        default=None,
        description="A JWKS file of public keys, read by the control plane and given to Envoy "
        "inline; re-read when it changes. Private keys in it are refused.",
    )
    gateway_jwks_cache_seconds: int = Field(
        default=300,
        ge=1,
        description="How long Envoy keeps keys fetched from `gateway_jwks_uri` before fetching "
        "them again.",
    )
    gateway_jwks_ca_file: Path = Field(
        default=Path("/etc/ssl/certs/ca-certificates.crt"),
        description="With an `https` `gateway_jwks_uri`: the CA certificates (PEM) Envoy checks "
        "the issuer's certificate against, a path on Envoy's host (the default is Debian's, "
        "Ubuntu's and Alpine's system bundle; RHEL's is `/etc/pki/tls/certs/ca-bundle.crt`).",
    )

    @field_validator("gateway_jwks_uri", "gateway_jwks_file", mode="before")
    @classmethod
    def _blank_jwks_is_unset(cls, value: object) -> object:
        return value or None

    @field_validator("gateway_auth", mode="before")
    @classmethod
    def _auth_mode(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        wanted = value.strip().lower() or "none"
        if wanted not in GATEWAY_AUTH_MODES:
            raise ValueError(f"AGENTPLEX_GATEWAY_AUTH must be none or jwt, not {wanted!r}")
        return wanted

    @model_validator(mode="after")
    def _auth_is_complete(self) -> GatewaySection:
        check_gateway_auth(
            self.gateway_auth,
            issuer=self.gateway_jwt_issuer,
            audiences=self.gateway_jwt_audiences,
            jwks_uri=self.gateway_jwks_uri,
            jwks_file=self.gateway_jwks_file,
        )
        return self


def check_gateway_auth(
    auth: str, *, issuer: str, audiences: str, jwks_uri: str | None, jwks_file: Path | None
) -> None:
    """Raises ValueError, naming the variables, unless the gateway's auth settings agree.

    Shared by `Settings` and the gateway's own settings (`gateway/settings.py`)."""
    given = [
        name
        for name, value in (
            ("AGENTPLEX_GATEWAY_JWT_ISSUER", issuer.strip()),
            ("AGENTPLEX_GATEWAY_JWT_AUDIENCES", audiences.strip()),
            ("AGENTPLEX_GATEWAY_JWKS_URI", jwks_uri),
            ("AGENTPLEX_GATEWAY_JWKS_FILE", jwks_file),
        )
        if value
    ]
    if auth != "jwt":
        # Token settings that would be silently ignored look like authentication is on.
        if given:
            raise ValueError(
                f"{', '.join(given)} set but AGENTPLEX_GATEWAY_AUTH is {auth!r}: "
                "set AGENTPLEX_GATEWAY_AUTH=jwt to check tokens, or unset them"
            )
        return
    if not issuer.strip():
        raise ValueError("AGENTPLEX_GATEWAY_AUTH=jwt needs AGENTPLEX_GATEWAY_JWT_ISSUER (the iss)")
    if not [a for a in audiences.split(",") if a.strip()]:
        raise ValueError(
            "AGENTPLEX_GATEWAY_AUTH=jwt needs AGENTPLEX_GATEWAY_JWT_AUDIENCES "
            "(the aud values accepted, comma-separated)"
        )
    if (jwks_uri is None) == (jwks_file is None):
        raise ValueError(
            "AGENTPLEX_GATEWAY_AUTH=jwt needs exactly one of AGENTPLEX_GATEWAY_JWKS_URI "
            "(the issuer's JWKS URL) and AGENTPLEX_GATEWAY_JWKS_FILE (a local JWKS file)"
        )
    if jwks_uri is not None:
        check_jwks_uri(jwks_uri)


def check_jwks_uri(uri: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an `http(s)://host[:port]/path` URL; ValueError if not."""
    parsed = urllib.parse.urlsplit(uri)
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port == -1:
        raise ValueError(
            f"AGENTPLEX_GATEWAY_JWKS_URI must be http(s)://host[:port]/path, not {uri!r}"
        )
    if parsed.username or parsed.password:
        raise ValueError("AGENTPLEX_GATEWAY_JWKS_URI must not carry credentials")
    # Whoever can change the keys in transit can mint tokens: plaintext only on loopback.
    if parsed.scheme == "http" and parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise ValueError(
            f"AGENTPLEX_GATEWAY_JWKS_URI must be https:// (signing keys fetched in plaintext "
            f"could be replaced on the way), not {uri!r}; http:// is for loopback only"
        )
    default = 443 if parsed.scheme == "https" else 80
    return parsed.scheme, parsed.hostname, port or default, parsed.path or "/"


class LauncherSection(Section):
    """Launcher.

    The `agentplex` command: `agentplex up` and the commands that find a
    running mesh through its state file.
    """

    state_file: Path = Field(
        default=Path(".agentplex/mesh.json"),
        description="Where `agentplex up` writes the running mesh's addresses, and where the "
        "other commands read them (`--state-file` overrides it).",
    )
    restart_backoff_seconds: float = Field(
        default=0.5,
        gt=0,
        description="`agentplex up` restarts a part that exited after this long, doubling the "
        "wait on each restart that did not stay up.",
    )
    restart_backoff_max_seconds: float = Field(
        default=30.0,
        gt=0,
        description="The longest wait between restarts of a crash-looping part.",
    )
    external_redis_url: str | None = Field(
        default=None,
        description="A Redis for `agentplex up` to use instead of starting an embedded one.",
        json_schema_extra={STANDARD_VARIABLE: "REDIS_URL"},
    )

    @field_validator("external_redis_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return value or None

    no_color: bool = Field(
        default=False,
        description="Print no colour, even on a terminal (the `agentplex` command colours only "
        "a terminal's output). Set to any non-empty value, as https://no-color.org asks: "
        "`NO_COLOR=0` turns colour off too.",
        json_schema_extra={STANDARD_VARIABLE: "NO_COLOR"},
    )

    @field_validator("no_color", mode="before")
    @classmethod
    def _any_text_is_set(cls, value: object) -> object:
        # NO_COLOR's rule: present and not empty, whatever the value.
        return value != "" if isinstance(value, str) else value


class MtlsSection(Section):
    """Service-to-service TLS.

    Mutual TLS between the parts of the mesh, and authorization by the peer's
    certificate identity (contract/callers.py). Off unless the three files are
    set; `python -m agentplex.runtime.tls DIR IDENTITY...` writes a development PKI.
    """

    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM file of the mesh CA every part trusts: a server accepts only clients "
        "with a certificate it signed, a client only servers. Set with `tls_cert_file` and "
        "`tls_key_file` (all three or none; none is plaintext).",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) of this part, issued by the mesh CA, carrying its "
        "identity as the URI SAN `spiffe://agentplex/<identity>` and as a DNS SAN.",
    )
    tls_key_file: Path | None = Field(
        default=None,
        description="PEM private key of `tls_cert_file` (mode 0600: a mounted Secret).",
    )
    tls_gateway_cert_file: Path | None = Field(
        default=None,
        description="Envoy's own certificate towards agents and the registry (identity "
        "`gateway`). The gateway's control plane puts the path in Envoy's configuration and "
        "Envoy reads the file; required there when mTLS is on.",
    )
    tls_gateway_key_file: Path | None = Field(
        default=None,
        description="The private key of `tls_gateway_cert_file`, read by Envoy.",
    )

    @field_validator(
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_gateway_cert_file",
        "tls_gateway_key_file",
        mode="before",
    )
    @classmethod
    def _blank_path_is_unset(cls, value: object) -> object:
        return value or None

    @model_validator(mode="after")
    def _tls_is_complete(self) -> MtlsSection:
        # Half a configuration would silently fall back to plaintext.
        mesh = {
            "tls_ca_file": self.tls_ca_file,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
        }
        gateway = {
            "tls_gateway_cert_file": self.tls_gateway_cert_file,
            "tls_gateway_key_file": self.tls_gateway_key_file,
        }
        for group in (mesh, gateway):
            missing = [ENV_PREFIX + name.upper() for name, value in group.items() if value is None]
            if missing and len(missing) < len(group):
                raise ValueError(f"mTLS is half configured: set {', '.join(missing)} too")
        if self.tls_gateway_cert_file is not None and self.tls_ca_file is None:
            raise ValueError(f"{ENV_PREFIX}TLS_GATEWAY_* need mTLS on ({ENV_PREFIX}TLS_CA_FILE)")
        return self


SECTIONS: tuple[type[Section], ...] = (
    SharedSection,
    MemorySection,
    RegistrySection,
    AgentsSection,
    TasksSection,
    GatewaySection,
    LauncherSection,
    MtlsSection,
)


def standard_variable(field: FieldInfo) -> str | None:
    """The standard variable a field also honours, besides its AGENTPLEX_ one."""
    extra = field.json_schema_extra
    variable = extra.get(STANDARD_VARIABLE) if isinstance(extra, dict) else None
    return variable if isinstance(variable, str) else None


class StandardVariables(PydanticBaseSettingsSource):
    """Reads the standard variables fields declare, without the prefix.

    Not a `validation_alias`: pydantic-settings matches aliases against init
    arguments case-insensitively, so an alias REDIS_URL would swallow
    ``Settings(redis_url=...)``.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = standard_variable(field)
        return (os.environ.get(variable) if variable else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                values[name] = value
        return values


class Settings(
    SharedSection,
    MemorySection,
    RegistrySection,
    AgentsSection,
    TasksSection,
    GatewaySection,
    LauncherSection,
    MtlsSection,
    BaseSettings,
):
    """Configuration of every agentplex process: all sections, one flat namespace."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments, then AGENTPLEX_* (the more specific), then standard variables.
        return (
            init_settings,
            env_settings,
            StandardVariables(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )
