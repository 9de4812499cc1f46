"""Peer benchmark: AutoGen's gRPC worker runtime doing one tool-call round trip.

Runs in its own virtualenv (see requirements-autogen.txt): autogen-ext pins an
older grpcio than agentplex, so this file imports nothing from agentplex.

Three processes on 127.0.0.1, as in a real AutoGen distributed deployment:
  host    GrpcWorkerAgentRuntimeHost, the router every message goes through
  agent   GrpcWorkerAgentRuntime with CalcAgent, which answers "what is 17*23?"
          by calling a FunctionTool (no LLM)
  client  this process: a GrpcWorkerAgentRuntime that send_message()s to the
          agent's AgentId and awaits the reply (client -> host -> agent -> host
          -> client), the call being measured.

    python autogen_peer.py --count 200 --in-flight 16

The last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import grpc  # type: ignore[import-untyped, unused-ignore]  # no stubs in the peer venv
from autogen_core import (
    AgentId,
    MessageContext,
    RoutedAgent,
    message_handler,
    try_get_known_serializers_for_type,
)
from autogen_core.tools import FunctionTool
from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime, GrpcWorkerAgentRuntimeHost

AGENT_TYPE = "calc"
QUESTION = "what is 17*23?"
EXPECTED = "391"
WARMUP = 20
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0  # the host silently drops undeliverable requests; never hang on one


@dataclass
class Ask:
    text: str


@dataclass
class Answer:
    text: str


async def multiply(a: int, b: int) -> int:
    """The tool. Async on purpose: FunctionTool runs a sync function in a thread
    pool, which would add a thread hop per call; this is AutoGen's best case."""
    return a * b


class CalcAgent(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("Answers arithmetic questions with one tool call.")
        self._tool = FunctionTool(multiply, description="Multiply two integers.")

    @message_handler
    async def on_ask(self, message: Ask, ctx: MessageContext) -> Answer:
        # Stands in for the model's tool-call decision: parse the operands, then
        # call the tool through FunctionTool's JSON entry point, as an LLM-driven
        # tool call would (argument validation via the tool's pydantic model).
        match = re.search(r"(\d+)\s*\*\s*(\d+)", message.text)
        if match is None:
            return Answer(text=f"cannot answer: {message.text!r}")
        a, b = int(match.group(1)), int(match.group(2))
        result = await self._tool.run_json({"a": a, "b": b}, ctx.cancellation_token)
        return Answer(text=f"{a}*{b} = {self._tool.return_value_as_string(result)}")


def _add_serializers(runtime: GrpcWorkerAgentRuntime) -> None:
    # Both ends of the gRPC runtime must know how to (de)serialize each payload type.
    for cls in (Ask, Answer):
        runtime.add_message_serializer(try_get_known_serializers_for_type(cls))


def _write_ready(path: Path, data: dict[str, str]) -> None:
    # Write then rename, so the parent never reads a half-written file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_host(ready_file: Path) -> None:
    # GrpcWorkerAgentRuntimeHost discards the port add_insecure_port returns, so
    # port 0 cannot be used. Pick a free port here instead, with SO_REUSEPORT off
    # so a port taken meanwhile fails to bind rather than being shared; retry then.
    for _ in range(10):
        address = f"127.0.0.1:{_free_port()}"
        try:
            host = GrpcWorkerAgentRuntimeHost(address, extra_grpc_config=[("grpc.so_reuseport", 0)])
            break
        except RuntimeError:
            continue
    else:
        raise RuntimeError("host: could not bind a free port")
    host.start()
    # start() only schedules the server; ready means it accepts connections.
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT_S)
    _write_ready(ready_file, {"address": address})
    await host.stop_when_signal(grace=1)


async def run_agent(host_address: str, ready_file: Path) -> None:
    runtime = GrpcWorkerAgentRuntime(host_address=host_address)
    _add_serializers(runtime)
    await runtime.start()
    # register() awaits the host's RegisterAgent RPC: once it returns, the host
    # routes AGENT_TYPE here.
    await CalcAgent.register(runtime, AGENT_TYPE, CalcAgent)
    _write_ready(ready_file, {"agent_type": AGENT_TYPE})
    await runtime.stop_when_signal()


def _spawn(args: list[str], ready_file: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args, "--ready-file", str(ready_file)]
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{args[1]} process exited early with code {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args[1]} process not ready within {READY_TIMEOUT_S:.0f}s")
        time.sleep(0.02)  # polling the ready file, not waiting blindly
    return proc, json.loads(ready_file.read_text())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _ask(runtime: GrpcWorkerAgentRuntime, agent: AgentId) -> None:
    try:
        reply = await asyncio.wait_for(
            runtime.send_message(Ask(text=QUESTION), agent), REQUEST_TIMEOUT_S
        )
    except TimeoutError:
        raise RuntimeError(f"no reply from {agent} within {REQUEST_TIMEOUT_S:.0f}s") from None
    if not isinstance(reply, Answer) or EXPECTED not in reply.text:
        raise RuntimeError(f"unexpected reply: {reply!r}")


async def run_client(host_address: str, count: int, in_flight: int) -> dict[str, object]:
    runtime = GrpcWorkerAgentRuntime(host_address=host_address)
    _add_serializers(runtime)
    await runtime.start()
    agent = AgentId(AGENT_TYPE, "default")
    try:
        for _ in range(WARMUP):
            await _ask(runtime, agent)

        # (a) one request at a time: latency.
        latencies: list[float] = []
        start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            await _ask(runtime, agent)
            latencies.append((time.perf_counter() - t0) * 1000)
        rps_1 = count / (time.perf_counter() - start)

        # (b) K requests in flight: K workers drawing from one shared budget.
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await _ask(runtime, agent)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        rps_k = count / (time.perf_counter() - start)
    finally:
        await runtime.stop()

    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "peer": "autogen-ext",
        "version": version("autogen-ext"),
        "grpcio": version("grpcio"),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(cuts[98], 3),
        "rps_1": round(rps_1, 1),
        "rps_k": round(rps_k, 1),
        "in_flight": in_flight,
        "count": count,
    }


def bench(count: int, in_flight: int) -> dict[str, object]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="autogen-peer-") as tmp:
        try:
            host, host_info = _spawn(["--role", "host"], Path(tmp, "host.json"))
            procs.append(host)
            address = host_info["address"]
            agent, _ = _spawn(
                ["--role", "agent", "--host-address", address], Path(tmp, "agent.json")
            )
            procs.append(agent)
            return asyncio.run(run_client(address, count, in_flight))
        finally:
            for proc in reversed(procs):  # agent first, so the host sees a clean disconnect
                _stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="requests per phase")
    parser.add_argument(
        "--in-flight", type=int, default=16, help="concurrent requests in phase (b)"
    )
    parser.add_argument(
        "--role", choices=["bench", "host", "agent"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--host-address", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.role == "host":
            asyncio.run(run_host(args.ready_file))
        elif args.role == "agent":
            asyncio.run(run_agent(args.host_address, args.ready_file))
        else:
            if args.count < 2 or args.in_flight < 1:
                parser.error("--count must be >= 2 and --in-flight >= 1")
            print(json.dumps(bench(args.count, args.in_flight)), flush=True)
    except Exception as exc:
        print(f"autogen_peer ({args.role}): error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
