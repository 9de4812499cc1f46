"""The built-in tool backend process: `python -m agentplex.tools`.

Serves calculator, notes.*, http.fetch and docs.search over ToolExecutorService and, once
listening, publishes their contracts (with its own address) to the registry.
Any number of such backends can run; the registry routes by address.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from agentplex.clients.registry import RegistryClient
from agentplex.contract.access import ACCESS
from agentplex.runtime import redis_client
from agentplex.runtime.process import Endpoint, run_process
from agentplex.runtime.server import ServiceHost
from agentplex.runtime.settings import Settings
from agentplex.runtime.tls import load_mesh_tls
from agentplex.tools.base import Tool
from agentplex.tools.calculator import Calculator
from agentplex.tools.docs_search import DocsSearch
from agentplex.tools.executor import ToolExecutorServicer
from agentplex.tools.http_fetch import HttpFetch
from agentplex.tools.notes import NotesRead, NotesWrite
from agentplex.v1 import tool_executor_service_pb2, tool_executor_service_pb2_grpc, tool_pb2

SERVICE_NAME = tool_executor_service_pb2.DESCRIPTOR.services_by_name[
    "ToolExecutorService"
].full_name
PUBLISH_TIMEOUT_SECONDS = 10.0


async def builtin_tools(docs_dir: Path | None) -> list[Tool]:
    """The built-in tools; docs.search over `docs_dir`, or the shipped docs when None."""
    return [
        Calculator(),
        NotesWrite(),
        NotesRead(),
        HttpFetch(),
        await DocsSearch.from_directory(docs_dir),
    ]


async def build_host(
    settings: Settings, *, port: int = 0, metrics_port: int | None = 0
) -> ServiceHost:
    redis = redis_client.connect(settings.redis_url)
    tools = await builtin_tools(settings.docs_dir)
    registry = RegistryClient(settings.registry_address, tls=await load_mesh_tls(settings))

    def register(server: grpc.aio.Server) -> list[str]:
        tool_executor_service_pb2_grpc.add_ToolExecutorServiceServicer_to_server(
            ToolExecutorServicer(tools, redis=redis, key_prefix=settings.key_prefix), server
        )
        return [SERVICE_NAME]

    published: list[str] = []

    async def publish(endpoint: Endpoint) -> None:
        published.append(endpoint.address)
        await registry.publish(
            [tool.definition for tool in tools],
            endpoint.address,
            tool_pb2.BACKEND_KIND_EXECUTOR,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    async def close() -> None:
        for address in published:
            await registry.withdraw(
                [tool.definition for tool in tools], address, timeout=PUBLISH_TIMEOUT_SECONDS
            )
        await registry.close()
        await redis.aclose()

    return ServiceHost.for_settings(
        settings,
        name="tools",
        register=register,
        port=port,
        metrics_port=metrics_port,
        dependency_checks=[redis_client.answers(redis)],
        on_start=[publish],
        on_stop=[close],
        access=ACCESS,
    )


def main(argv: list[str] | None = None) -> None:
    async def build(settings: Settings, args: argparse.Namespace) -> ServiceHost:
        return await build_host(settings, port=args.port, metrics_port=args.metrics_port)

    run_process("python -m agentplex.tools", build, name="tools", argv=argv)
