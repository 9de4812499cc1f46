"""`agentplex serve PART`: each part alone, from its environment, as a container runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplex.gateway.settings import GatewaySettings
from agentplex.mesh import serve
from agentplex.runtime.server import LIVENESS_SERVICE
from agentplex.runtime.settings import Settings
from agentplex.v1 import tool_registry_service_pb2 as registry_pb2
from agentplex.v1 import tool_registry_service_pb2_grpc as registry_grpc

AGENTPLEX = str(Path(sys.executable).with_name("agentplex"))


def test_a_per_agent_part_takes_the_agent_name_first() -> None:
    assert serve.part_argv("agent", ["assistant", "--agents", "x.yaml"]) == [
        "--agent",
        "assistant",
        "--agents",
        "x.yaml",
    ]
    assert serve.part_argv("memory", ["--port", "1"]) == ["--port", "1"]
    with pytest.raises(ValueError, match="name the agent"):
        serve.part_argv("worker", ["--port", "1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "nosuchpart"], "invalid choice: 'nosuchpart'"),
        (["serve", "agent"], "name the agent, e.g. agentplex serve agent assistant"),
        (["serve"], "the following arguments are required: PART"),
    ],
)
def test_a_bad_part_is_a_usage_error(argv: list[str], message: str) -> None:
    done = subprocess.run([AGENTPLEX, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_every_part_names_a_main_that_exists() -> None:
    for name, part in serve.PARTS.items():
        assert callable(part.load()), name


@pytest.fixture
async def run_part(
    tmp_path: Path, settings: Settings
) -> AsyncIterator[Callable[..., asyncio.Future[dict[str, object]]]]:
    """`await run_part("memory", AGENTPLEX_X=…)`: `agentplex serve …` as its own process, on
    the test's Redis, configured only by its environment; its ready file's contents."""
    started: list[asyncio.subprocess.Process] = []

    async def start(*words: str, **env: str) -> dict[str, object]:
        ready = tmp_path / f"{len(started)}.ready"
        process = await asyncio.create_subprocess_exec(
            AGENTPLEX,
            "serve",
            *words,
            "--ready-file",
            str(ready),
            env={
                **os.environ,
                "AGENTPLEX_REDIS_URL": settings.redis_url,
                "AGENTPLEX_KEY_PREFIX": settings.key_prefix,
                "AGENTPLEX_DRAIN_SECONDS": "0",
                **env,
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(tmp_path / f"{len(started)}.log").open("wb"),
        )
        started.append(process)
        for _ in range(600):
            if ready.exists():
                return dict(json.loads(ready.read_text()))
            if process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        log = (tmp_path / f"{len(started) - 1}.log").read_text()
        raise AssertionError(f"agentplex serve {' '.join(words)} did not start:\n{log[-2000:]}")

    yield start  # type: ignore[misc]  # the fixture hands out the coroutine function
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=30)


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)  # type: ignore[attr-defined]  # the stub declares no methods
        return int(response.status)


async def test_parts_bound_to_every_interface_publish_the_advertised_address(
    run_part: Callable[..., asyncio.Future[dict[str, object]]],
) -> None:
    # The registry by the name "localhost" (DNS, not an IP), the port from the environment.
    registry = await run_part("registry", AGENTPLEX_HOST="0.0.0.0", AGENTPLEX_PORT="0")
    registry_port = str(registry["address"]).rsplit(":", 1)[1]
    tools = await run_part(
        "tools",
        AGENTPLEX_HOST="0.0.0.0",
        AGENTPLEX_ADVERTISE_HOST="127.0.0.1",
        AGENTPLEX_REGISTRY_ADDRESS=f"localhost:{registry_port}",
    )
    assert str(tools["address"]).startswith("127.0.0.1:")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_port}") as channel:
        found = await registry_grpc.ToolRegistryServiceStub(channel).GetTool(
            registry_pb2.GetToolRequest(name="calculator"), timeout=5
        )
    # What the registry routes calls to is the advertised address, never 0.0.0.0.
    assert list(found.tool.endpoints) == [tools["address"]]


async def test_liveness_is_serving_while_readiness_follows_the_dependencies(
    run_part: Callable[..., asyncio.Future[dict[str, object]]],
) -> None:
    # Redis that is not there: the part starts, is alive, and is not ready.
    memory = await run_part(
        "memory",
        AGENTPLEX_REDIS_URL="redis://127.0.0.1:1/0",
        AGENTPLEX_HEALTH_INTERVAL_SECONDS="0.2",
    )
    address = str(memory["address"])
    assert await health(address, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert await health(address) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_control_plane_for_a_gateway_open_to_other_machines_needs_tokens() -> None:
    env = {
        **os.environ,
        "AGENTPLEX_GATEWAY_LISTEN_HOST": "0.0.0.0",
        "AGENTPLEX_GATEWAY_AUTH": "none",
    }
    env.pop("AGENTPLEX_GATEWAY_ALLOW_UNAUTHENTICATED", None)
    done = subprocess.run(
        [AGENTPLEX, "serve", "gateway-control-plane"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert "would listen on 0.0.0.0 and check no tokens" in done.stderr


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"listen_host": "0.0.0.0"}, True),
        ({"listen_host": "::"}, True),
        ({"listen_host": "127.0.0.1"}, False),
        ({"listen_host": "localhost"}, False),
        ({"listen_host": "0.0.0.0", "allow_unauthenticated": True}, False),
        (
            {
                "listen_host": "0.0.0.0",
                "auth": "jwt",
                "jwt_issuer": "i",
                "jwt_audiences": "a",
                "jwks_file": "/tmp/jwks.json",
            },
            False,
        ),
    ],
)
def test_which_gateways_are_open_to_anyone(settings: dict[str, object], refused: bool) -> None:
    assert (GatewaySettings(**settings).open_to_anyone() is not None) is refused  # type: ignore[arg-type]  # the fields' own types vary


async def test_up_refuses_an_open_gateway_before_starting_anything(tmp_path: Path) -> None:
    from agentplex.mesh.launcher import LaunchError, MeshLauncher

    launcher = MeshLauncher(
        state_file=tmp_path / "mesh.json",
        settings=Settings(gateway_listen_host="0.0.0.0"),
        auth=False,
        say=lambda _: None,
    )
    with pytest.raises(LaunchError, match="check no tokens"):
        await launcher.start()
    assert not (tmp_path / "logs").exists() and not launcher.supervisor.parts
