"""`MemoryClient`: how agents reach the Memory service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from agentplex.contract import callers
from agentplex.runtime.clients import call_with_deadline, open_channel
from agentplex.v1 import memory_pb2
from agentplex.v1 import memory_service_pb2 as pb
from agentplex.v1 import memory_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # only the type: runtime.tls needs cryptography, a mesh extra
    from agentplex.runtime.tls import MeshTls


class MemoryClient:
    def __init__(
        self,
        address: str,
        *,
        channel: grpc.aio.Channel | None = None,
        tls: MeshTls | None = None,
    ) -> None:
        """`tls`: the caller's mesh credentials, when mTLS is on (ignored with `channel`)."""
        self._channel = channel or open_channel(address, tls=tls, server_identity=callers.MEMORY)
        self._stub = pb_grpc.MemoryServiceStub(self._channel)

    async def load(
        self, agent: str, session_id: str, max_tokens: int, *, timeout: float
    ) -> pb.LoadContextResponse:
        request = pb.LoadContextRequest(
            scope=memory_pb2.SessionScope(agent=agent, session_id=session_id),
            max_tokens=max_tokens,
        )
        return await call_with_deadline(self._stub.LoadContext, request, timeout=timeout)

    async def append(
        self,
        agent: str,
        session_id: str,
        messages: Sequence[memory_pb2.MemoryMessage],
        *,
        timeout: float,
    ) -> int:
        request = pb.AppendMessagesRequest(
            scope=memory_pb2.SessionScope(agent=agent, session_id=session_id),
            messages=messages,
        )
        response = await call_with_deadline(self._stub.AppendMessages, request, timeout=timeout)
        return int(response.message_count)

    async def read(
        self, agent: str, session_id: str, start_position: int, max_messages: int, *, timeout: float
    ) -> pb.ReadMessagesResponse:
        request = pb.ReadMessagesRequest(
            scope=memory_pb2.SessionScope(agent=agent, session_id=session_id),
            start_position=start_position,
            max_messages=max_messages,
        )
        return await call_with_deadline(self._stub.ReadMessages, request, timeout=timeout)

    async def store_summary(
        self,
        agent: str,
        session_id: str,
        summary: memory_pb2.ContextSummary,
        expected_through_position: int,
        *,
        timeout: float,
    ) -> pb.StoreSummaryResponse:
        request = pb.StoreSummaryRequest(
            scope=memory_pb2.SessionScope(agent=agent, session_id=session_id),
            summary=summary,
            expected_through_position=expected_through_position,
        )
        return await call_with_deadline(self._stub.StoreSummary, request, timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()
