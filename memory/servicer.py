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
        self, request: pb.AppendMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.AppendMessagesResponse:
        count = await self._store.append(request.scope, request.messages)
        return pb.AppendMessagesResponse(message_count=count)

    async def LoadContext(
        self, request: pb.LoadContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadContextResponse:
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        packet = await self._store.load(request.scope, max_tokens)
        return pb.LoadContextResponse(
            messages=packet.messages,
            token_count=packet.token_count,
            omitted_count=packet.omitted_count,
        )

    async def ClearSession(
        self, request: pb.ClearSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearSessionResponse:
        return pb.ClearSessionResponse(existed=await self._store.clear(request.scope))
