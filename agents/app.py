"""Assembles one agent process: LLM provider, registry and memory clients, runner, host."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from agentplex.agents.catalog import AgentSpec, AgentSpecError, UnknownAgent, resolve
from agentplex.agents.context import ContextManager, ContextPolicy
from agentplex.agents.events import EventSink
from agentplex.agents.llm.base import LLMProvider
from agentplex.agents.llm.factory import build_provider
from agentplex.agents.quota import QuotaPolicy, TokenQuota
from agentplex.agents.runner import AgentRunner, CancelCheck, TaskOutcome
from agentplex.agents.servicer import AgentServicer
from agentplex.clients.memory import MemoryClient
from agentplex.clients.registry import RegistryClient
from agentplex.contract import agent_tool as delegation_tool
from agentplex.contract import callers, limits, lineage
from agentplex.contract.access import ACCESS
from agentplex.contract.task_request import TaskRequest
from agentplex.runtime import redis_client
from agentplex.runtime.clients import Deadline, Keepalive, health_status, open_channel
from agentplex.runtime.process import CannotStart, Endpoint, run_process
from agentplex.runtime.server import DependencyCheck, ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import TlsFiles
from agentplex.tasks.event_feed import EventFeed
from agentplex.tasks.service import TaskService
from agentplex.tasks.store import TaskStore
from agentplex.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
)

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 10.0
SERVICE_NAME = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def agent_card(spec: AgentSpec, model: str) -> agent_pb2.AgentCard:
    max_steps = spec.limits.max_steps or limits.MAX_STEPS_LIMIT
    max_budget = spec.limits.token_budget or limits.MAX_TOKEN_BUDGET
    return agent_pb2.AgentCard(
        name=spec.name,
        version=spec.version,
        description=spec.description,
        tools=list(spec.tool_names),
        model=model,
        limits=agent_pb2.AgentLimits(
            max_steps_limit=max_steps,
            default_max_steps=min(limits.DEFAULT_MAX_STEPS, max_steps),
            min_token_budget=limits.MIN_TOKEN_BUDGET,
            max_token_budget=max_budget,
            default_token_budget=min(limits.DEFAULT_TOKEN_BUDGET, max_budget),
            max_prompt_bytes=limits.MAX_PROMPT_BYTES,
        ),
    )


class SpecRunner(AgentRunner):
    """An `AgentRunner` holding every task to its spec's caps (`limits:` in the spec file):
    a task asking for more steps or tokens than its agent allows runs with the cap."""

    async def run(
        self,
        task: TaskRequest,
        deadline: Deadline,
        sink: EventSink,
        *,
        last_sequence: int = 0,
        interrupt: asyncio.Event | None = None,
        cancel_requested: CancelCheck | None = None,
    ) -> TaskOutcome:
        return await super().run(
            capped(self.spec, task),
            deadline,
            sink,
            last_sequence=last_sequence,
            interrupt=interrupt,
            cancel_requested=cancel_requested,
        )


class DepthCappedTools:
    """The registry client, refusing this agent's delegations that would go deeper than its
    spec's `delegation_depth` before they leave the process: the same refusal
    (FAILED_PRECONDITION, DELEGATION_DEPTH_EXCEEDED) the registry gives past the mesh-wide
    AGENTPLEX_MAX_DELEGATION_DEPTH, which still holds as well."""

    def __init__(self, tools: RegistryClient, spec: AgentSpec, max_depth: int) -> None:
        self._tools = tools
        self._spec = spec
        self._max_depth = max_depth

    async def list_tools(
        self, agent: str = "", *, timeout: float
    ) -> tool_registry_service_pb2.ListToolsResponse:
        return await self._tools.list_tools(agent, timeout=timeout)

    async def invoke(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> tool_registry_service_pb2.InvokeToolResponse:
        self._check(request)
        return await self._tools.invoke(request, timeout=timeout)

    async def invoke_stream(
        self, request: tool_registry_service_pb2.InvokeToolRequest, *, timeout: float
    ) -> AsyncIterator[tool_registry_service_pb2.InvokeToolStreamResponse]:
        self._check(request)
        async for item in self._tools.invoke_stream(request, timeout=timeout):
            yield item

    def _check(self, request: tool_registry_service_pb2.InvokeToolRequest) -> None:
        if delegation_tool.is_agent_tool(request.tool_name):
            lineage.check_delegation(
                caller_agent=self._spec.name,
                caller=request.caller.lineage,
                target=delegation_tool.agent_of_tool(request.tool_name),
                max_depth=self._max_depth,
            )


def capped(spec: AgentSpec, task: TaskRequest) -> TaskRequest:
    """`task` within `spec`'s limits on steps and tokens."""
    update: dict[str, int] = {}
    if spec.limits.max_steps is not None and task.max_steps > spec.limits.max_steps:
        update["max_steps"] = spec.limits.max_steps
    if spec.limits.token_budget is not None and task.token_budget > spec.limits.token_budget:
        update["token_budget"] = spec.limits.token_budget
    return task.model_copy(update=update) if update else task


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
    # The spec's model and memory policy take the place of the mesh-wide settings.
    settings = spec.settings(settings)
    llm = llm or build_provider(settings)
    keepalive = Keepalive.from_settings(settings)
    # This process's certificate (`agent` or `worker`): read once, at start.
    tls_files = TlsFiles.from_settings(settings)
    mesh_tls = tls_files.read() if tls_files is not None else None
    memory_channel = open_channel(
        settings.memory_address, keepalive, tls=mesh_tls, server_identity=callers.MEMORY
    )
    registry_channel = open_channel(
        settings.registry_address, keepalive, tls=mesh_tls, server_identity=callers.REGISTRY
    )
    redis = redis_client.connect(settings.redis_url)
    registry = RegistryClient(settings.registry_address, channel=registry_channel)
    memory = MemoryClient(settings.memory_address, channel=memory_channel)
    quota_policy = QuotaPolicy.from_settings(settings)
    runner = SpecRunner(
        spec=spec,
        llm=llm,
        tools=(
            registry
            if spec.limits.delegation_depth is None
            else DepthCappedTools(registry, spec, spec.limits.delegation_depth)
        ),
        memory=memory,
        context_tokens=settings.context_tokens,
        context=ContextManager(
            memory=memory, llm=llm, policy=ContextPolicy.from_settings(settings)
        ),
        tool_list_max_age=settings.tool_list_max_age_seconds,
        # In the Redis every agent shares, so each tenant's quota holds mesh-wide.
        quota=(
            TokenQuota(redis, key_prefix=settings.key_prefix, policy=quota_policy)
            if quota_policy.enabled
            else None
        ),
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


def grant_problems(
    spec: AgentSpec, stored: list[tool_registry_service_pb2.ToolGrant], applied: bool
) -> list[str]:
    """Why the registry's access list is not the spec's: an operator set one
    (SetAgentTools), which an agent's default never replaces."""
    wanted = {(grant.name, grant.major) for grant in spec.grants}
    if applied or {(grant.name, grant.major) for grant in stored} == wanted:
        return []
    kept = ", ".join(f"{g.name}@{g.major}" for g in stored) or "nothing"
    return [
        f"the registry keeps the access list an operator set ({kept}) over the spec's "
        f"({', '.join(spec.tools) or 'nothing'}{', from ' + spec.source if spec.source else ''}); "
        "SetAgentTools changes it"
    ]


def missing_tools(spec: AgentSpec, visible: set[str]) -> list[str]:
    """Granted tools the registry does not list (yet): a misspelled name, or a tool
    whose backend has not published it. Not an error: tools may come after agents."""
    return [
        f"no tool {name!r} is published (granted{' at ' + spec.source if spec.source else ''}); "
        "the model will not see it until it is"
        for name in spec.tool_names
        # Delegates start alongside: their agent.<name> tools come and go with them.
        if name not in visible and not delegation_tool.is_agent_tool(name)
    ]


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
        stored = await parts.registry.set_agent_tools(
            spec.name, spec.grants, only_if_unset=True, timeout=PUBLISH_TIMEOUT_SECONDS
        )
        for problem in grant_problems(spec, list(stored.grants), stored.applied):
            log.warning("%s: %s", spec.name, problem, extra={"spec": spec.source})
        visible = await parts.registry.list_tools(spec.name, timeout=PUBLISH_TIMEOUT_SECONDS)
        for problem in missing_tools(spec, {tool.name for tool in visible.tools}):
            log.warning("%s: %s", spec.name, problem, extra={"spec": spec.source})
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
        access=ACCESS,
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


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """`--agent NAME` and `--agents FILE`, for the agent and worker processes alike."""
    parser.add_argument(
        "--agent",
        required=True,
        metavar="NAME",
        help="which agent: a built-in one (assistant, researcher, supervisor) or one the "
        "--agents files declare",
    )
    parser.add_argument(
        "--agents",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="an agent spec file (YAML) to take agents from, besides the built-in ones; repeatable",
    )


def spec_from_args(args: argparse.Namespace) -> AgentSpec:
    """The spec `--agent` names, among the built-ins and the `--agents` files."""
    try:
        return resolve(args.agent, args.agents)
    except (AgentSpecError, UnknownAgent) as exc:
        raise CannotStart(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    async def build(settings: Settings, args: argparse.Namespace) -> ServiceHost:
        spec = spec_from_args(args)
        require_agent_model(spec.settings(settings))
        return build_host(spec, settings, port=args.port, metrics_port=args.metrics_port)

    run_process(
        "python -m agentplex.agents",
        build,
        name=lambda args: args.agent,
        add_arguments=add_agent_arguments,
        argv=argv,
    )
