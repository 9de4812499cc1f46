"""The live agent directory, read from the Tool Registry.

Every agent publishes itself as the tool `agent.<name>` with its address when
it starts and withdraws that address when it stops, so the registry already
knows which replicas exist; the gateway reads it rather than keeping a second
list that could disagree. A replica that dies without withdrawing stays
listed here, and Envoy's active health checks take it out of rotation.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc

from agentplex.gateway.resources import Directory, HostPort
from agentplex.runtime.clients import call_with_deadline
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

AGENT_TOOL_PREFIX = "agent."


class AgentDirectory:
    def __init__(self, channel: grpc.aio.Channel, registry_addresses: list[str]) -> None:
        self._stub = pb_grpc.ToolRegistryServiceStub(channel)
        # IPs or DNS names (a headless Service: one address per registry replica).
        self._registry = tuple(
            HostPort.parse(address, allow_names=True) for address in registry_addresses
        )

    async def _registry_replicas(self) -> tuple[HostPort, ...]:
        """The registry's addresses as IPs, resolved again on every read so the gateway
        follows its replicas (Envoy's endpoint discovery takes IPs only)."""
        loop = asyncio.get_running_loop()
        replicas: set[HostPort] = set()
        for address in self._registry:
            if not address.is_name:
                replicas.add(address)
                continue
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            replicas.update(HostPort(str(info[4][0]), address.port) for info in infos)
        return tuple(sorted(replicas))

    async def read(self, *, timeout: float = 2.0) -> Directory:
        """One consistent read; raises (grpc.aio.AioRpcError) when the registry is unreachable."""
        listing = await call_with_deadline(
            self._stub.ListTools, pb.ListToolsRequest(all_versions=True), timeout=timeout
        )
        agent_tools = [
            tool
            for tool in listing.tools
            if tool.backend_kind == tool_pb2.BACKEND_KIND_AGENT
            and tool.name.startswith(AGENT_TOOL_PREFIX)
            and tool.state != tool_pb2.TOOL_STATE_RETIRED
        ]
        described = await asyncio.gather(
            *(
                call_with_deadline(
                    self._stub.GetTool,
                    pb.GetToolRequest(name=tool.name, version=tool.version),
                    timeout=timeout,
                )
                for tool in agent_tools
            )
        )
        agents: dict[str, set[HostPort]] = {}
        for response in described:
            name = response.tool.name.removeprefix(AGENT_TOOL_PREFIX)
            replicas = agents.setdefault(name, set())
            for endpoint in response.tool.endpoints:
                try:
                    replicas.add(HostPort.parse(endpoint))
                except ValueError:
                    log.warning(
                        "skipping an agent endpoint Envoy cannot route to",
                        extra={"agent": name, "endpoint": endpoint},
                    )
        return Directory(
            agents={name: tuple(sorted(hosts)) for name, hosts in agents.items() if hosts},
            registry=await self._registry_replicas(),
        )
