"""`agentplex restart` of an agent with replicas, through the gateway, under load: not one
call fails. The supervisor restarts one replica at a time and waits for the gateway
to route to it again before it stops the next."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc

pytestmark = pytest.mark.slow

CLIENTS = 3  # unary and streaming callers each
MAX_CALLS = 3000
MAX_SECONDS = 240.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, object]]]:
    workdir = tmp_path_factory.mktemp("rolling")
    state_file = workdir / ".agentplex" / "mesh.json"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        {
            "AGENTPLEX_SCRIPTED_DELAY_SECONDS": "0.05",
            "AGENTPLEX_DRAIN_SECONDS": "2",
            "AGENTPLEX_GRACE_SECONDS": "10",
            "AGENTPLEX_GATEWAY_HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
        }
    )
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentplex.mesh",
            "up",
            "--ephemeral-ports",
            "--workers",
            "1",
            "--replicas",
            "assistant=2",
            # Plaintext, no tokens: this module is about restarts, its client calls the
            # gateway without a token.
            "--no-auth",
            "--no-mtls",
        ],
        stdout=(workdir / "up.out").open("w"),
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=env,
    )
    try:
        give_up = time.monotonic() + 120
        while not state_file.exists() and up.poll() is None and time.monotonic() < give_up:
            time.sleep(0.1)
        if not state_file.exists():
            pytest.fail(f"agentplex up did not come up:\n{(workdir / 'up.out').read_text()}")
        yield workdir, json.loads(state_file.read_text())
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()


async def test_restarting_replicas_through_the_supervisor_loses_no_call(mesh) -> None:
    workdir, state = mesh
    gateway = str(state["gateway"])
    failures: list[str] = []
    calls = {"unary": 0, "stream": 0}
    done = asyncio.Event()
    deadline = time.monotonic() + MAX_SECONDS

    def more() -> bool:
        total = calls["unary"] + calls["stream"]
        return not done.is_set() and total < MAX_CALLS and time.monotonic() < deadline

    async def unary(stub: agent_service_pb2_grpc.AgentServiceStub) -> None:
        while more():
            try:
                response = await stub.RunTask(pb.RunTaskRequest(prompt="what is 6*7"), timeout=30)
                if response.result.output.strip() != "6*7 = 42.":
                    failures.append(f"RunTask answered {response.result.output!r}")
            except grpc.aio.AioRpcError as err:
                failures.append(f"RunTask {err.code().name}: {err.details()}")
            calls["unary"] += 1

    async def stream(stub: agent_service_pb2_grpc.AgentServiceStub) -> None:
        while more():
            try:
                kinds = [
                    response.event.WhichOneof("kind")
                    async for response in stub.StreamSteps(
                        pb.StreamStepsRequest(prompt="what is 6*7"), timeout=30
                    )
                ]
                if kinds[-1:] != ["final_result"]:
                    failures.append(f"StreamSteps ended with {kinds[-1:]}")
            except grpc.aio.AioRpcError as err:
                failures.append(f"StreamSteps {err.code().name}: {err.details()}")
            calls["stream"] += 1

    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        load = [asyncio.create_task(unary(stub)) for _ in range(CLIENTS)]
        load += [asyncio.create_task(stream(stub)) for _ in range(CLIENTS)]
        try:
            for _ in range(2):
                restart = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "agentplex.mesh",
                    "restart",
                    "assistant",
                    cwd=workdir,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(restart.communicate(), timeout=120)
                assert restart.returncode == 0, err.decode()
                assert "assistant-2" in out.decode()
        finally:
            done.set()
            await asyncio.gather(*load)

    assert calls["unary"] > 10 and calls["stream"] > 10, calls
    assert failures == [], f"{len(failures)} of {sum(calls.values())} calls failed: {failures[:5]}"
