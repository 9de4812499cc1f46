"""A registry process SIGKILLed in the middle of a tool call, and the retried call.

The registry runs as a real process (`python -m agentplex.registry`) on the
suite's Redis; the tool's backend is a gRPC ToolExecutorService in the test
that holds the call until the registry is dead, then completes it: the side
effect happened, and nobody lived to store its answer. The caller sees the
registry vanish (UNAVAILABLE, which a task's runner turns into
MESH_UNAVAILABLE and a retried attempt) and calls again under the same
idempotency key, through a registry started in its place. A side-effecting
tool must not run a second time: the retry gets OUTCOME_UNKNOWN. A read-only
one simply runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agentplex.registry.backends import BackendRouter
from agentplex.registry.ledger import IdempotencyLedger
from agentplex.registry.service import ToolRegistry
from agentplex.registry.store import RegistryStore
from agentplex.runtime.interceptors import EdgeInterceptor
from agentplex.v1 import tool_executor_service_pb2 as ex
from agentplex.v1 import tool_executor_service_pb2_grpc as ex_grpc
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

TOOL_TIMEOUT = 2.0  # the registry holds a claim for twice this
KEY = "t-killed:1:0"


class HeldBackend(ex_grpc.ToolExecutorServiceServicer):
    """Counts calls; the first one is held until `release`, then answers."""

    def __init__(self) -> None:
        self.calls = 0
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def ExecuteTool(self, request, context):
        self.calls += 1
        if self.calls == 1:
            self.reached.set()
            await self.release.wait()
        return ex.ExecuteToolResponse(result_json=json.dumps({"ok": True}))


@pytest.fixture
async def backend() -> AsyncIterator[tuple[HeldBackend, str]]:
    servicer = HeldBackend()
    server = grpc.aio.server(interceptors=[EdgeInterceptor()])
    ex_grpc.add_ToolExecutorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        servicer.release.set()
        await server.stop(0)


class RegistryProcesses:
    """Registry processes on the test's Redis and key prefix."""

    def __init__(self, tmp_path: Path, redis_url: str, key_prefix: str) -> None:
        self._tmp = tmp_path
        self._env = {
            **os.environ,
            "AGENTPLEX_REDIS_URL": redis_url,
            "AGENTPLEX_KEY_PREFIX": key_prefix,
            "AGENTPLEX_TOOL_TIMEOUT_SECONDS": str(TOOL_TIMEOUT),
            "AGENTPLEX_GRACE_SECONDS": "1",
            "AGENTPLEX_DRAIN_SECONDS": "0",
            "AGENTPLEX_LOG_LEVEL": "INFO",
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    async def start(
        self, eventually: Callable[..., Awaitable[None]]
    ) -> tuple[subprocess.Popen[bytes], str]:
        index = len(self.processes)
        ready = self._tmp / f"registry-{index}.ready"
        log = (self._tmp / f"registry-{index}.log").open("wb")
        # Popen only forks and execs; the waiting is done by polling below.
        process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "agentplex.registry", "--ready-file", str(ready)],
            env=self._env,
            stdout=log,
            stderr=log,
        )
        log.close()
        self.processes.append(process)
        await eventually(
            lambda: ready.exists() or process.poll() is not None,
            timeout=30,
            message="the registry did not start",
        )
        if process.poll() is not None:
            raise AssertionError(f"the registry exited: {self.log(index)}")
        return process, json.loads(ready.read_text())["address"]

    def log(self, index: int) -> str:
        return (self._tmp / f"registry-{index}.log").read_text(errors="replace")[-3000:]

    async def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for _ in range(200):  # bounded: 10 s
            if all(process.poll() is not None for process in self.processes):
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def registries(
    tmp_path: Path, redis_url: str, key_prefix: str
) -> AsyncIterator[RegistryProcesses]:
    processes = RegistryProcesses(tmp_path, redis_url, key_prefix)
    try:
        yield processes
    finally:
        await processes.stop_all()


async def publish(
    redis_client: aioredis.Redis,
    key_prefix: str,
    name: str,
    endpoint: str,
    side_effect: tool_pb2.SideEffect,
) -> None:
    """Publish the tool on the shared Redis, as any registry would."""
    router = BackendRouter(tool_timeout_seconds=TOOL_TIMEOUT)
    try:
        await ToolRegistry(
            store=RegistryStore(redis_client, key_prefix=key_prefix),
            ledger=IdempotencyLedger(redis_client, key_prefix=key_prefix),
            router=router,
        ).register(
            tool_pb2.ToolDefinition(
                name=name,
                version="1.0.0",
                description="Held.",
                input_schema_json=json.dumps({"type": "object", "properties": {}}),
                output_schema_json=json.dumps({"type": "object"}),
                side_effect=side_effect,
                endpoint=endpoint,
            )
        )
    finally:
        await router.close()


def request(name: str) -> pb.InvokeToolRequest:
    return pb.InvokeToolRequest(
        tool_name=name, idempotency_key=KEY, caller=pb.Caller(session_id="s-killed")
    )


@pytest.mark.parametrize(
    ("side_effect", "runs_again"),
    [(tool_pb2.SIDE_EFFECT_SIDE_EFFECTING, False), (tool_pb2.SIDE_EFFECT_READ_ONLY, True)],
    ids=["side-effecting", "read-only"],
)
async def test_a_call_cut_by_a_killed_registry_is_not_run_twice(
    registries, backend, redis_client, key_prefix, channel_to, eventually, side_effect, runs_again
) -> None:
    servicer, endpoint = backend
    await publish(redis_client, key_prefix, "held.tool", endpoint, side_effect)
    first, address = await registries.start(eventually)
    stub = pb_grpc.ToolRegistryServiceStub(channel_to(address))
    call = asyncio.ensure_future(stub.InvokeTool(request("held.tool"), timeout=30))
    try:
        await eventually(
            lambda: servicer.reached.is_set() or call.done(),
            timeout=15,
            message="the call never reached the backend",
        )
        assert servicer.reached.is_set(), call.result()
        first.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await asyncio.wait_for(call, timeout=15)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if not call.done():
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await call
    servicer.release.set()  # the side effect completes after all: nobody stores it
    await eventually(lambda: first.poll() is not None, message="the registry did not die")

    # The registry comes back (as the supervisor restarts it); the caller retries.
    _, address = await registries.start(eventually)
    retry = pb_grpc.ToolRegistryServiceStub(channel_to(address))
    retried = await retry.InvokeTool(request("held.tool"), timeout=30)
    if runs_again:
        assert not retried.replayed and json.loads(retried.result_json) == {"ok": True}
        assert servicer.calls == 2
    else:
        assert retried.replayed and retried.error.code == "OUTCOME_UNKNOWN", retried
        assert servicer.calls == 1  # not run twice
    # Whatever the retry got is the key's answer from now on.
    again = await retry.InvokeTool(request("held.tool"), timeout=30)
    assert again.replayed and servicer.calls == (2 if runs_again else 1)
