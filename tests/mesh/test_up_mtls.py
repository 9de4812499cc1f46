"""`agentplex up`'s mutual TLS (on by default), for real: every hop over mutual TLS,
callers authorized by the identity in their certificate. One mesh for the whole module,
with `--no-auth`: tokens at the gateway are not what this module tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from agentplex.contract import callers
from agentplex.runtime.tls import TlsFiles
from agentplex.v1 import memory_pb2, memory_service_pb2, memory_service_pb2_grpc

pytestmark = pytest.mark.slow


def agentplex(*args: str, state_file: Path) -> subprocess.CompletedProcess[str]:
    """The CLI from the mesh's directory, with its default state file."""
    return subprocess.run(
        [sys.executable, "-m", "agentplex.mesh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=state_file.parent.parent,
    )


@pytest.fixture(scope="module")
def mtls_mesh(mesh_up) -> Iterator[Path]:
    with mesh_up("--mtls", "--no-auth") as (state_file, _):
        yield state_file


def _state(state_file: Path) -> dict[str, object]:
    return dict(json.loads(state_file.read_text()))


def _load_context(channel: grpc.Channel) -> memory_service_pb2.LoadContextResponse:
    stub = memory_service_pb2_grpc.MemoryServiceStub(channel)
    request = memory_service_pb2.LoadContextRequest(
        scope=memory_pb2.SessionScope(agent="assistant", session_id="s"), max_tokens=100
    )
    return stub.LoadContext(request, timeout=5)


def test_state_names_the_pki(mtls_mesh: Path) -> None:
    pki = Path(str(_state(mtls_mesh)["pki"]))
    assert pki == mtls_mesh.parent / "pki"
    assert (pki / "ca.pem").is_file() and (pki / "cli.pem").is_file()


def test_cli_runs_a_task_over_mtls(mtls_mesh: Path) -> None:
    done = agentplex("run", "what is 17*23?", state_file=mtls_mesh)
    assert done.returncode == 0, done.stderr
    assert "391" in done.stdout
    listed = agentplex("tools", "list", state_file=mtls_mesh)
    assert listed.returncode == 0, listed.stderr
    assert "calculator" in listed.stdout


def test_delegation_goes_registry_to_agent_over_mtls(mtls_mesh: Path) -> None:
    """The supervisor's sub-tasks: registry → agent (identity `agent`), run by workers."""
    done = agentplex(
        "run",
        "--agent",
        "supervisor",
        "what is 17*23 and how does the tool registry validate arguments?",
        state_file=mtls_mesh,
    )
    assert done.returncode == 0, done.stderr
    assert "assistant: 17*23 = 391." in done.stdout


def test_gateway_reaches_the_agent_over_mtls(mtls_mesh: Path) -> None:
    state = _state(mtls_mesh)
    response = httpx.post(
        f"http://{state['gateway']}/v1/agents/assistant/tasks:run",
        json={"prompt": "what is 17*23?"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert "391" in response.json()["result"]["output"]


def test_plaintext_caller_cannot_connect(mtls_mesh: Path) -> None:
    with grpc.insecure_channel(str(_state(mtls_mesh)["memory"])) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _load_context(channel)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_identity_not_in_the_caller_table_is_refused(mtls_mesh: Path) -> None:
    """The tool backend's certificate is valid, but tools may not call memory."""
    state = _state(mtls_mesh)
    tools = TlsFiles.for_identity(Path(str(state["pki"])), callers.TOOLS).read()
    with grpc.secure_channel(
        str(state["memory"]),
        tools.channel_credentials(),
        options=[("grpc.ssl_target_name_override", callers.MEMORY)],
    ) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            _load_context(channel)
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'tools'" in (failed.value.details() or "")
