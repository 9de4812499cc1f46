"""Peer benchmark: the A2A Python SDK (a2a-sdk) over gRPC doing one tool-call round trip.

Runs in its own virtualenv (see requirements-a2a.txt), so this file imports
nothing from agentplex.

Two processes on 127.0.0.1:
  server  grpc.aio server with the SDK's GrpcHandler -> DefaultRequestHandler ->
          CalcExecutor (an AgentExecutor), which answers "what is 17*23?" by
          calling a local multiply() tool (no LLM) and enqueues one reply Message
  client  this process: an SDK Client (ClientFactory, gRPC transport, unary
          SendMessage) whose send_message() round trip is the call measured.

    python a2a_peer.py --count 200 --in-flight 16

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import grpc
from a2a.client import Client, ClientConfig, ClientFactory, minimal_agent_card
from a2a.helpers import get_message_text, get_stream_response_text, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler, GrpcHandler
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import a2a_pb2, a2a_pb2_grpc
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol

QUESTION = "what is 17*23?"
EXPECTED = "391"
WARMUP = 20
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0  # a lost request fails the run instead of hanging it


def multiply(a: int, b: int) -> int:
    """The tool: a plain local function, called in-process."""
    return a * b


# Tool name -> function, called with JSON arguments as a model's tool call would be.
TOOLS: dict[str, Callable[..., int]] = {"multiply": multiply}


class CalcExecutor(AgentExecutor):
    """Answers arithmetic questions with exactly one tool call."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        question = context.get_user_input()
        # Stands in for the model's tool-call decision: parse the operands, then
        # dispatch by tool name with JSON-encoded arguments.
        match = re.search(r"(\d+)\s*\*\s*(\d+)", question)
        if match is None:
            text = f"cannot answer: {question!r}"
        else:
            name, arguments = "multiply", json.dumps({"a": int(match[1]), "b": int(match[2])})
            result = TOOLS[name](**json.loads(arguments))
            text = f"{match[1]}*{match[2]} = {result}"
        # One Message is the SDK's "immediate response" shape: no task states to track.
        await event_queue.enqueue_event(new_text_message(text, context_id=context.context_id))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError("replies are immediate; nothing to cancel")


def _agent_card(address: str) -> a2a_pb2.AgentCard:
    return a2a_pb2.AgentCard(
        name="calc",
        description="Answers arithmetic questions with one tool call.",
        version="1.0.0",
        supported_interfaces=[
            a2a_pb2.AgentInterface(
                url=address,
                protocol_binding=TransportProtocol.GRPC,
                protocol_version=PROTOCOL_VERSION_CURRENT,
            )
        ],
        # streaming=False: clients use the unary SendMessage RPC, one request/one reply.
        capabilities=a2a_pb2.AgentCapabilities(streaming=False, extended_agent_card=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            a2a_pb2.AgentSkill(
                id="multiply", name="multiply", description="Multiply two integers.", tags=["math"]
            )
        ],
    )


def _write_ready(path: Path, data: dict[str, str]) -> None:
    # Write then rename, so the parent never reads a half-written file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


async def serve(ready_file: Path) -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")  # the OS picks a free port
    if port == 0:
        raise RuntimeError("could not bind 127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    card = _agent_card(address)
    handler = DefaultRequestHandler(
        agent_executor=CalcExecutor(),
        task_store=InMemoryTaskStore(),
        agent_card=card,
        extended_agent_card=card,
    )
    a2a_pb2_grpc.add_A2AServiceServicer_to_server(GrpcHandler(handler), server)
    await server.start()  # listening once this returns
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _write_ready(ready_file, {"address": address})
    await stop.wait()
    await server.stop(grace=1)


def _spawn_server(ready_file: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    # Server output goes to a log (shown on failure): the harness reads our stdout.
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--ready-file", str(ready_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists():
        if proc.poll() is not None:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"server exited early with code {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"server not ready within {READY_TIMEOUT_S:.0f}s")
        time.sleep(0.02)  # polling the ready file, not waiting blindly
    return proc, str(json.loads(ready_file.read_text())["address"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _connect(address: str) -> Client:
    config = ClientConfig(
        streaming=False,
        supported_protocol_bindings=[TransportProtocol.GRPC],
        grpc_channel_factory=grpc.aio.insecure_channel,
    )
    factory = ClientFactory(config)
    # gRPC agents serve no /.well-known card: bootstrap from a minimal card, fetch
    # the real one over gRPC (GetExtendedAgentCard), then build the client from it.
    async with factory.create(minimal_agent_card(address, [TransportProtocol.GRPC])) as bootstrap:
        card = await bootstrap.get_extended_agent_card(a2a_pb2.GetExtendedAgentCardRequest())
    return factory.create(card)


async def _ask(client: Client) -> None:
    message = new_text_message(QUESTION, role=a2a_pb2.Role.ROLE_USER)  # fresh message_id
    request = a2a_pb2.SendMessageRequest(message=message)

    async def call() -> list[str]:
        return [get_stream_response_text(r) async for r in client.send_message(request)]

    texts = await asyncio.wait_for(call(), REQUEST_TIMEOUT_S)
    if not any(EXPECTED in t for t in texts):
        raise RuntimeError(f"unexpected reply to {get_message_text(message)!r}: {texts!r}")


async def run_client(address: str, count: int, in_flight: int) -> dict[str, object]:
    client = await _connect(address)
    try:
        for _ in range(WARMUP):
            await _ask(client)

        # (a) one request at a time: latency.
        latencies: list[float] = []
        start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            await _ask(client)
            latencies.append((time.perf_counter() - t0) * 1000)
        rps_1 = count / (time.perf_counter() - start)

        # (b) K requests in flight: K workers drawing from one shared budget.
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await _ask(client)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        rps_k = count / (time.perf_counter() - start)
    finally:
        await client.close()

    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "peer": "a2a-sdk",
        "version": version("a2a-sdk"),
        "transport": "grpc",
        "grpcio": version("grpcio"),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(cuts[98], 3),
        "rps_1": round(rps_1, 1),
        "rps_k": round(rps_k, 1),
        "in_flight": in_flight,
        "count": count,
    }


def bench(count: int, in_flight: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="a2a-peer-") as tmp:
        server, address = _spawn_server(Path(tmp, "ready.json"), Path(tmp, "server.log"))
        try:
            return asyncio.run(run_client(address, count, in_flight))
        finally:
            _stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="requests per phase")
    parser.add_argument("--in-flight", type=int, default=16, help="requests in flight, phase (b)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    role = "server" if args.serve else "client"
    try:
        if args.serve:
            if args.ready_file is None:
                parser.error("--serve needs --ready-file")
            asyncio.run(serve(args.ready_file))
        else:
            if args.count < 2 or args.in_flight < 1:
                parser.error("--count must be >= 2 and --in-flight >= 1")
            print(json.dumps(bench(args.count, args.in_flight)), flush=True)
    except Exception as exc:
        print(f"a2a_peer ({role}): error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
