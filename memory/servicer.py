"""gRPC adapter for `MemoryStore`: proto in, proto out, nothing else."""

from __future__ import annotations

import grpc

from agentplex.memory.store import MemoryStore
from agentplex.v1 import memory_service_pb2 as pb
from agentplex.v1 import memory_service_pb2_grpc as pb_grpc


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def AppendMessages(
        self,
        request: pb.AppendMessagesRequest,
        context: grpc.aio.ServicerContext[pb.AppendMessagesRequest, pb.AppendMessagesResponse],
    ) -> pb.AppendMessagesResponse:
        count = await self._store.append(request.scope, request.messages)
        return pb.AppendMessagesResponse(message_count=count)

    async def LoadContext(
        self,
        request: pb.LoadContextRequest,
        context: grpc.aio.ServicerContext[pb.LoadContextRequest, pb.LoadContextResponse],
    ) -> pb.LoadContextResponse:
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        packet = await self._store.load(request.scope, max_tokens)
        return pb.LoadContextResponse(
            messages=packet.messages,
            token_count=packet.token_count,
            omitted_count=packet.omitted_count,
            summary=packet.summary,
            next_position=packet.next_position,
        )

    async def ClearSession(
        self,
        request: pb.ClearSessionRequest,
        context: grpc.aio.ServicerContext[pb.ClearSessionRequest, pb.ClearSessionResponse],
    ) -> pb.ClearSessionResponse:
        return pb.ClearSessionResponse(existed=await self._store.clear(request.scope))

    async def ReadMessages(
        self,
        request: pb.ReadMessagesRequest,
        context: grpc.aio.ServicerContext[pb.ReadMessagesRequest, pb.ReadMessagesResponse],
    ) -> pb.ReadMessagesResponse:
        stored = await self._store.read(request.scope, request.start_position, request.max_messages)
        return pb.ReadMessagesResponse(messages=stored.messages, next_position=stored.next_position)

    async def StoreSummary(
        self,
        request: pb.StoreSummaryRequest,
        context: grpc.aio.ServicerContext[pb.StoreSummaryRequest, pb.StoreSummaryResponse],
    ) -> pb.StoreSummaryResponse:
        stored = await self._store.store_summary(
            request.scope, request.summary, request.expected_through_position
        )
        return pb.StoreSummaryResponse(
            removed_count=stored.removed_count, message_count=stored.message_count
        )
