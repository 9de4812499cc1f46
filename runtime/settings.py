"""Typed configuration, read once from the environment (prefix ``AGENTPLEX_``).

Every process of the mesh reads the same settings class; the launcher passes
addresses down through the environment, so a service started by hand and one
started by ``agentplex up`` behave the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration shared by all agentplex services."""

    model_config = SettingsConfigDict(env_prefix="AGENTPLEX_", extra="ignore")

    host: str = "127.0.0.1"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Namespaces every Redis key, so several meshes (or tests) can share one Redis.
    key_prefix: str = "agentplex"
    memory_address: str = "127.0.0.1:50051"
    registry_address: str = "127.0.0.1:50052"

    # Seconds a stopping server lets in-flight calls finish after SIGTERM.
    grace_seconds: float = Field(default=10.0, ge=0)
    # How often a service re-checks its dependencies for its health status.
    health_interval_seconds: float = Field(default=1.0, gt=0)
    log_level: str = "INFO"
    # "console" prints finished spans as JSON to stderr; "none" keeps them in-process only.
    trace_exporter: Literal["none", "console"] = "none"

    # Memory
    memory_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    memory_default_context_tokens: int = Field(default=2048, ge=1)
    # Hard cap on stored turns per session; older ones are trimmed on append.
    memory_max_messages: int = Field(default=1000, ge=2)

    # Registry
    docs_dir: Path = Field(default_factory=Path.cwd)
    tool_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long the registry remembers an idempotency key's outcome.
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    # Delegation: deepest sub-task allowed (a root task is depth 0).
    max_delegation_depth: int = Field(default=3, ge=0)
    # Circuit breaker per downstream agent: consecutive failures that open it,
    # and how long it stays open before one probe call is let through.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_reset_seconds: float = Field(default=30.0, gt=0)

    # Agents
    llm_provider: Literal["scripted", "openai"] = "scripted"
    openai_base_url: str = "http://127.0.0.1:8080/v1"
    openai_api_key: SecretStr = SecretStr("")
    openai_model: str = "gpt-4o-mini"
    llm_timeout_seconds: float = Field(default=60.0, gt=0)
    # Simulated model latency of the scripted model, per call (demos, chaos runs).
    scripted_delay_seconds: float = Field(default=0.0, ge=0)
    # Token limit of the memory packet loaded into each task's prompt.
    context_tokens: int = Field(default=2048, ge=64)
    # Stored turns a session keeps verbatim; past this (or past context_tokens) the
    # oldest are summarized by the agent's own model into Memory (agents/context.py).
    context_max_messages: int = Field(default=40, ge=2)
    # Upper bound of one summary, in tokens; at most half of context_tokens is used.
    context_summary_tokens: int = Field(default=256, ge=16)
    # How long an agent process reuses the tool list it last read for new tasks
    # (a tool call reporting a newer registry revision ends it sooner); 0: read
    # it at the start of every task. The registry checks every call regardless.
    tool_list_max_age_seconds: float = Field(default=1.0, ge=0)
    # Deadline applied to a task whose caller set none (every RPC has one).
    default_task_timeout_seconds: float = Field(default=300.0, gt=0)

    # Durable tasks
    # Unfinished tasks an agent's queue accepts before SubmitTask says RESOURCE_EXHAUSTED.
    task_queue_limit: int = Field(default=1000, ge=1)
    # A worker silent this long is presumed dead and its task is reclaimed.
    task_lease_seconds: float = Field(default=10.0, gt=0)
    # Attempts that died before a task is dead-lettered.
    task_max_attempts: int = Field(default=3, ge=1)
    # How long a finished task's events stay watchable, and its record readable.
    task_event_retention_seconds: int = Field(default=24 * 3600, ge=1)
    task_record_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    # How long a worker holds a task's first unwritten event so the next few share
    # its Redis write (watchers see events up to this much later); 0: write at once.
    task_event_linger_seconds: float = Field(default=0.005, ge=0, le=1)
    # Tasks one worker process runs at once.
    worker_concurrency: int = Field(default=4, ge=1)
