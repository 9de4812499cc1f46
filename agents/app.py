"""Assembles one agent process: LLM provider, registry and memory clients, runner, host."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from agentplex.agents.catalog import CATALOG, AgentSpec
from agentplex.agents.context import ContextManager, ContextPolicy
from agentplex.agents.llm.base import LLMProvider
from agentplex.agents.llm.factory import build_provider
from agentplex.agents.runner import AgentRunner
from agentplex.agents.servicer import AgentServicer
from agentplex.clients.memory import MemoryClient
from agentplex.clients.registry import RegistryClient
from agentplex.contract import agent_tool as delegation_tool
from agentplex.contract import limits
from agentplex.runtime import redis_client
from agentplex.runtime.clients import Keepalive, health_status, open_channel
from agentplex.runtime.process import CannotStart, Endpoint, run_process
from agentplex.runtime.server import DependencyCheck, ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.tasks.event_feed import EventFeed
from agentplex.tasks.service import TaskService
from agentplex.tasks.store import TaskStore
from agentplex.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc, tool_pb2

PUBLISH_TIMEOUT_SECONDS = 10.0
SERVICE_NAME = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def agent_card(spec: AgentSpec, model: str) -> agent_pb2.AgentCard:
    return agent_pb2.AgentCard(
        name=spec.name,
        version=spec.version,
        description=spec.description,
        tools=list(spec.tool_names),
        model=model,
        limits=agent_pb2.AgentLimits(
            max_steps_limit=limits.MAX_STEPS_LIMIT,
            default_max_steps=limits.DEFAULT_MAX_STEPS,
            min_token_budget=limits.MIN_TOKEN_BUDGET,
            max_token_budget=limits.MAX_TOKEN_BUDGET,
            default_token_budget=limits.DEFAULT_TOKEN_BUDGET,
            max_prompt_bytes=limits.MAX_PROMPT_BYTES,
        ),
    )


def agent_tool(spec: AgentSpec) -> tool_pb2.ToolDefinition:
    """The tool contract through which other agents (and operators) delegate to `spec`."""
    return delegation_tool.definition(
        agent=spec.name, version=spec.version, description=spec.description
    )


def _serving_check(channel: grpc.aio.Channel, what: str) -> DependencyCheck:
    async def check() -> None:
        if await health_status(channel, timeout=1.0) != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{what} is not serving")

    return check


@dataclass
class AgentParts:
    """What an agent process (server or worker) is built from."""

    runner: AgentRunner
    registry: RegistryClient
    tasks: TaskStore
    # One blocking read of Redis for every WatchTask this process serves.
    events: EventFeed
    llm: LLMProvider
    dependency_checks: list[DependencyCheck]
    close: Callable[[], Awaitable[None]]


def build_parts(
    spec: AgentSpec, settings: Settings, *, llm: LLMProvider | None = None
) -> AgentParts:
    llm = llm or build_provider(settings)
    keepalive = Keepalive.from_settings(settings)
    memory_channel = open_channel(settings.memory_address, keepalive)
    registry_channel = open_channel(settings.registry_address, keepalive)
    redis = redis_client.connect(settings.redis_url)
    registry = RegistryClient(settings.registry_address, channel=registry_channel)
    memory = MemoryClient(settings.memory_address, channel=memory_channel)
    runner = AgentRunner(
        spec=spec,
        llm=llm,
        tools=registry,
        memory=memory,
        context_tokens=settings.context_tokens,
        context=ContextManager(
            memory=memory, llm=llm, policy=ContextPolicy.from_settings(settings)
        ),
        tool_list_max_age=settings.tool_list_max_age_seconds,
    )
    tasks = TaskStore(
        redis,
        key_prefix=settings.key_prefix,
        agent=spec.name,
        queue_limit=settings.task_queue_limit,
        record_ttl_seconds=settings.task_record_ttl_seconds,
        event_retention_seconds=settings.task_event_retention_seconds,
    )

    events = EventFeed(redis)

    async def close() -> None:
        await llm.aclose()
        await memory_channel.close()
        await registry_channel.close()
        await events.close()
        await redis.aclose()

    return AgentParts(
        runner=runner,
        registry=registry,
        tasks=tasks,
        events=events,
        llm=llm,
        dependency_checks=[
            redis_client.answers(redis),
            _serving_check(memory_channel, "memory"),
            _serving_check(registry_channel, "registry"),
        ],
        close=close,
    )


def build_host(
    spec: AgentSpec,
    settings: Settings,
    *,
    port: int = 0,
    metrics_port: int | None = 0,
    llm: LLMProvider | None = None,
) -> ServiceHost:
    parts = build_parts(spec, settings, llm=llm)
    servicer = AgentServicer(
        parts.runner,
        agent_card(spec, parts.llm.model),
        TaskService(parts.tasks, parts.events),
        default_timeout_seconds=settings.default_task_timeout_seconds,
    )

    def register(server: grpc.aio.Server) -> list[str]:
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    published: list[str] = []

    async def publish_as_tool(endpoint: Endpoint) -> None:
        # The registry knows agents only from what they publish: the access list
        # (as a default, so an operator's SetAgentTools is kept across restarts)
        # and the agent as a tool (agent.<name>), the path delegation takes.
        await parts.registry.set_agent_tools(
            spec.name, spec.grants, only_if_unset=True, timeout=PUBLISH_TIMEOUT_SECONDS
        )
        published.append(endpoint.address)
        await parts.registry.publish(
            [agent_tool(spec)],
            endpoint.address,
            tool_pb2.BACKEND_KIND_AGENT,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    async def withdraw_and_close() -> None:
        for address in published:
            await parts.registry.withdraw([agent_tool(spec)], address, timeout=5.0)
        await parts.close()

    return ServiceHost.for_settings(
        settings,
        name=spec.name,
        register=register,
        on_start=[publish_as_tool],
        port=port,
        metrics_port=metrics_port,
        dependency_checks=parts.dependency_checks,
        on_stop=[withdraw_and_close],
    )


def require_agent_model(settings: Settings) -> None:
    """Refuse `llm_provider=local` in an agent process: only `agentplex up` can honour it.

    The launcher starts the local model and hands its children `openai`
    pointing at it; an agent started by hand would otherwise quietly run the
    scripted model instead.
    """
    if settings.llm_provider == "local":
        raise CannotStart(
            "AGENTPLEX_LLM_PROVIDER=local is for `agentplex up`, which starts the local model; "
            "point a hand-started agent at a model server with AGENTPLEX_LLM_PROVIDER=openai "
            "and AGENTPLEX_OPENAI_BASE_URL"
        )


def main(argv: list[str] | None = None) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--agent", required=True, choices=sorted(CATALOG), help="which agent")

    async def build(settings: Settings, args: argparse.Namespace) -> ServiceHost:
        require_agent_model(settings)
        return build_host(
            CATALOG[args.agent], settings, port=args.port, metrics_port=args.metrics_port
        )

    run_process(
        "python -m agentplex.agents",
        build,
        name=lambda args: args.agent,
        add_arguments=add_arguments,
        argv=argv,
    )
