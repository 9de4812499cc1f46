"""The newcomer's own agent, for real (README, "Your own agent"): a spec file declares a
fourth agent with a tool of its own, published from YAML with a small Python backend;
`agentplex up --agents FILE --no-mtls` runs it (the README's backend serves plaintext;
tokens at the gateway stay on, as by default); the gateway lists it to a caller with a
token; a streamed task calls its tool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentplex.mesh import cli

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

# The README's files, verbatim but for the backend's port.
AGENTS_YAML = """\
agents:
  - name: greeter
    description: Greets people by name.
    instructions: >-
      You greet people. Call greet.say with the user's words and answer with its greeting.
    tools: [greet.say@1]
    limits: {max_steps: 4, token_budget: 4096}
    memory: {context_tokens: 1024, max_messages: 20}
"""

GREET_YAML = """\
name: greet.say
version: 1.0.0
description: Greets the person named last in the text.
side_effect: read_only
endpoint: {endpoint}
input_schema:
  type: object
  properties:
    text: {{type: string, minLength: 1, maxLength: 1000}}
  required: [text]
  additionalProperties: false
output_schema:
  type: object
  properties:
    greeting: {{type: string}}
  required: [greeting]
"""

GREET_BACKEND = '''\
"""The greet.say tool's backend: a ToolExecutorService in a few lines."""

import asyncio
import json
import sys

import grpc

from agentplex.v1 import tool_executor_service_pb2 as pb
from agentplex.v1 import tool_executor_service_pb2_grpc as pb_grpc


class Greeter(pb_grpc.ToolExecutorServiceServicer):
    async def ExecuteTool(self, request, context):
        text = json.loads(request.arguments_json)["text"]
        name = text.split()[-1].strip(".!?")
        return pb.ExecuteToolResponse(result_json=json.dumps({"greeting": f"Hello, {name}!"}))


async def main(address: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ToolExecutorServiceServicer_to_server(Greeter(), server)
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50090"))
'''


def agentplex(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentplex.mesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.05)


def accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


def listed_agents(gateway: str, token: str) -> list[str]:
    request = urllib.request.Request(
        f"http://{gateway}/v1/agents", headers={"authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return [agent["name"] for agent in json.load(response)["agents"]]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A team's directory with its agent file, tool contract and the tool's backend running."""
    backend_address = f"127.0.0.1:{_free_port()}"
    (tmp_path / "team-agents.yaml").write_text(AGENTS_YAML)
    (tmp_path / "greet.yaml").write_text(GREET_YAML.format(endpoint=backend_address))
    (tmp_path / "greet_backend.py").write_text(GREET_BACKEND)
    backend = subprocess.Popen(
        [sys.executable, "greet_backend.py", backend_address],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: accepts(backend_address) or backend.poll() is not None, 30, "no backend")
        assert backend.poll() is None, "the greet.say backend exited"
        yield tmp_path
    finally:
        stop(backend)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_fourth_agent_declared_in_a_file_runs_with_its_own_tool(workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["AGENTPLEX_DOCS_DIR"] = str(REPO_ROOT)
    state_file = workdir / ".agentplex" / "mesh.json"
    mesh = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentplex.mesh",
            "up",
            "--ephemeral-ports",
            "--agents",
            "team-agents.yaml",
            "--no-mtls",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,
        env=env,
    )
    try:
        wait_for(lambda: state_file.exists() or mesh.poll() is not None, 120, "no mesh")
        if mesh.poll() is not None:
            assert mesh.stdout is not None
            pytest.fail(f"agentplex up exited early:\n{mesh.stdout.read()}")
        state = json.loads(state_file.read_text())
        assert state["agents"] == ["assistant", "greeter", "researcher", "supervisor"]
        assert state["greeter"].startswith("127.0.0.1:")
        assert "greeter-worker-1" in state["workers"]

        # The tool, published from YAML: the greeter's access list came from its spec.
        registered = agentplex("tools", "register", "greet.yaml", cwd=workdir)
        assert registered.stdout.strip() == "greet.say 1.0.0: published", registered.stderr
        granted = agentplex("tools", "list", "--agent", "greeter", cwd=workdir)
        assert "greet.say" in granted.stdout and "calculator" not in granted.stdout

        # Listed through the gateway, and served by it, with a token (README).
        minted = agentplex("token", "--tenant", "dev", cwd=workdir)
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        wait_for(
            lambda: "greeter" in listed_agents(state["gateway"], token),
            60,
            "the gateway lists greeter",
        )
        request = urllib.request.Request(
            f"http://{state['gateway']}/v1/agents/greeter/tasks:run",
            data=json.dumps({"prompt": "please greet.say hello to Grace"}).encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert "Hello, Grace!" in json.load(response)["result"]["output"]

        streamed = agentplex(
            "run", "--stream", "--agent", "greeter", "please greet.say hello to Ada", cwd=workdir
        )
        assert streamed.returncode == 0, streamed.stderr
        # As the README shows it.
        assert (
            '[  4] tool call  greet.say@1.0.0 {"text": "please greet.say hello to Ada"}'
            in streamed.stdout
        ), streamed.stdout
        assert 'answer: greet.say returned {"greeting": "Hello, Ada!"}.' in streamed.stdout

        # Its queue and worker, too.
        submitted = agentplex(
            "submit", "--agent", "greeter", "--task-id", "g-1", "greet.say Lin", cwd=workdir
        )
        assert submitted.stdout.strip() == "g-1", submitted.stderr
        watched = agentplex("watch", "g-1", "--agent", "greeter", "--result", cwd=workdir)
        assert "Hello, Lin!" in watched.stdout, watched.stderr
        unknown = agentplex("run", "--agent", "nobody", "hi", cwd=workdir)
        assert unknown.returncode == cli.EXIT_USAGE
        assert "this mesh runs: assistant, greeter, researcher, supervisor" in unknown.stderr
    finally:
        stop(mesh)
    assert mesh.stdout is not None
    output = mesh.stdout.read()
    assert "agentplex: agents from team-agents.yaml: greeter" in output


def test_up_picks_up_the_default_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli._agent_specs([])[0] == []
    Path("agentplex.agents.yaml").write_text(AGENTS_YAML)
    files, loaded = cli._agent_specs([])
    assert files == [Path("agentplex.agents.yaml")]
    assert "greeter" in loaded.agents
    Path("other.yaml").write_text(AGENTS_YAML.replace("greeter", "welcomer"))
    files, loaded = cli._agent_specs([Path("other.yaml")])
    assert files == [Path("other.yaml")] and "greeter" not in loaded.agents
    Path("agentplex.agents.yaml").write_text(AGENTS_YAML + "    colour: blue\n")
    with pytest.raises(cli.CliError) as refused:
        cli._agent_specs([])
    assert refused.value.code == cli.EXIT_USAGE
    assert "agentplex.agents.yaml:9: agents[0].colour: unknown field 'colour'" in str(refused.value)
