"""A bare grpc.aio echo server: the floor one mesh hop is compared with.

Generic handlers on raw bytes, no protobuf, no interceptors: what one unary
or server-streaming call costs on this machine and this grpcio. It also
answers grpc.health.v1 (SERVING), so the gateway's health checks let it into
rotation when the gateway scenario routes the same echo through Envoy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from agentplex.runtime import loop as event_loop

ECHO = "/bench.Echo/Echo"
STREAM = "/bench.Echo/Stream"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    for _ in range(int(request or b"1")):
        yield b"x" * 64


def _identity(data: bytes) -> bytes:
    return data


async def serve(ready_file: Path) -> None:
    server = grpc.aio.server()
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=_identity, response_serializer=_identity
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _stream, request_deserializer=_identity, response_serializer=_identity
        ),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", handlers)])
    health = health_aio.HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(ready_file.write_text, json.dumps({"address": f"127.0.0.1:{port}"}))
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agentplex.bench.echo")
    parser.add_argument("--ready-file", type=Path, required=True)
    event_loop.run(serve(parser.parse_args().ready_file))


if __name__ == "__main__":
    main()
