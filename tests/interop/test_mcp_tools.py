"""MCP tool servers in the registry: `agentplex tools import-mcp` and its bridge.

Real MCP servers, written with the `mcp` SDK here, reached over both transports
(a stdio subprocess, and streamable HTTP served on a loopback port), and the
real registry of the in-process mesh: every call goes through InvokeTool, so
what the registry does for any backend (validation, ledger, result checks) is
what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agentplex.interop.mcp_tools import (
    TEXT_OUTPUT_SCHEMA,
    ImportRefused,
    McpBridge,
    McpServer,
    McpTool,
    definition,
    tool_name,
)
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc

# The MCP server the tests import. Variants: v1 is the first release; v2 makes
# `add` take a required `c` (a breaking change); v3 an optional `c` (compatible).
SERVER_SOURCE = """
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

READ_ONLY = ToolAnnotations(read_only_hint=True)


def build(variant: str) -> MCPServer:
    server = MCPServer("demo")
    if variant == "v1":

        @server.tool(description="Adds two integers.", annotations=READ_ONLY)
        def add(a: int, b: int) -> int:
            return a + b

    elif variant == "v2":

        @server.tool(description="Adds two integers.", annotations=READ_ONLY)
        def add(a: int, b: int, c: int) -> int:
            return a + b + c

    else:

        @server.tool(description="Adds two integers.", annotations=READ_ONLY)
        def add(a: int, b: int, c: int = 0) -> int:
            return a + b + c

    @server.tool(description="Always fails.", annotations=READ_ONLY)
    def fail() -> str:
        raise ToolError("the disk is full")

    @server.tool(description="Echoes the text back, as text.", structured_output=False)
    def echoText(text: str) -> str:
        return f"echo: {text}"

    return server


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "v1").run()
"""

WAIT_SECONDS = 30.0


@pytest.fixture
def server_file(tmp_path: Path) -> Path:
    path = tmp_path / "demo_mcp_server.py"
    path.write_text(SERVER_SOURCE)
    return path


def stdio_command(server_file: Path, variant: str = "v1") -> str:
    return shlex.join([sys.executable, str(server_file), variant])


@contextlib.asynccontextmanager
async def http_server(server_file: Path, variant: str = "v1", port: int = 0) -> AsyncIterator[str]:
    """The server over streamable HTTP on a loopback port (any free one by default), in
    a thread of its own (its own event loop); yields its URL."""
    import uvicorn

    spec = importlib.util.spec_from_file_location(f"demo_mcp_server_{variant}", server_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.build(variant).streamable_http_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mcp-http", daemon=True)
    thread.start()
    give_up = time.monotonic() + WAIT_SECONDS
    while not server.started:
        assert thread.is_alive(), "the MCP HTTP server did not start"
        assert time.monotonic() < give_up, f"the MCP HTTP server did not start in {WAIT_SECONDS}s"
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound}/mcp"
    finally:
        # At once: a graceful exit would wait for the bridge's open event stream.
        server.should_exit = server.force_exit = True
        await asyncio.to_thread(thread.join, WAIT_SECONDS)
        assert not thread.is_alive(), "the MCP HTTP server did not stop"


@pytest.fixture(params=["stdio", "http"])
async def demo_server(request, server_file) -> AsyncIterator[McpServer]:
    """The demo MCP server over each transport."""
    if request.param == "stdio":
        yield McpServer.stdio(stdio_command(server_file))
    else:
        async with http_server(server_file) as url:
            yield McpServer.http(url)


@pytest.fixture
async def registry(mesh, channel_to) -> pb_grpc.ToolRegistryServiceStub:
    return pb_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))


@pytest.fixture
async def bridge(mesh, demo_server) -> AsyncIterator[McpBridge]:
    async with McpBridge(name="demo", server=demo_server, registry_address=mesh.registry) as b:
        yield b


async def invoke(
    registry, tool: str, arguments: dict[str, object], key: str = ""
) -> pb.InvokeToolResponse:
    """As an operator (no agent): the registry checks schemas, not an access list."""
    return await registry.InvokeTool(
        pb.InvokeToolRequest(
            tool_name=tool, arguments_json=json.dumps(arguments), idempotency_key=key
        ),
        timeout=WAIT_SECONDS,
    )


# --- the mapping --------------------------------------------------------------------------


def test_mcp_names_become_registry_names():
    assert tool_name("demo", "add") == "demo.add"
    assert tool_name("gh", "getWeather") == "gh.get_weather"
    assert tool_name("gh", "list-issues") == "gh.list_issues"
    assert tool_name("acme.files", "2fa_Check") == "acme.files.tool_2fa_check"
    with pytest.raises(ImportRefused):
        tool_name("demo", "--")


def test_annotations_map_to_side_effects_and_text_results_get_a_schema():
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    read_only = McpTool("look", "Looks.", schema, read_only=True, idempotent=True)
    idempotent = McpTool("put", "Puts.", schema, read_only=False, idempotent=True)
    unsaid = McpTool("send", "", schema)
    assert definition("d", "1.0.0", read_only).side_effect == tool_pb2.SIDE_EFFECT_READ_ONLY
    assert definition("d", "1.0.0", idempotent).side_effect == tool_pb2.SIDE_EFFECT_IDEMPOTENT
    sent = definition("d", "1.0.0", unsaid)
    assert sent.side_effect == tool_pb2.SIDE_EFFECT_SIDE_EFFECTING
    assert sent.description  # the registry needs one; the MCP server gave none
    assert json.loads(sent.output_schema_json) == TEXT_OUTPUT_SCHEMA
    assert json.loads(sent.input_schema_json) == schema


# --- through the registry, over both transports --------------------------------------------


async def test_mcp_tools_are_published_with_their_schemas(bridge, registry):
    add = (await registry.GetTool(pb.GetToolRequest(name="demo.add"), timeout=10)).tool
    assert add.version == "1.0.0"
    assert add.side_effect == tool_pb2.SIDE_EFFECT_READ_ONLY
    assert add.endpoints == [bridge.address]
    assert json.loads(add.input_schema_json)["required"] == ["a", "b"]
    # A structured tool: its own output schema (the SDK wraps an int as `result`).
    assert json.loads(add.output_schema_json)["properties"]["result"]["type"] == "integer"
    echo = (await registry.GetTool(pb.GetToolRequest(name="demo.echo_text"), timeout=10)).tool
    assert echo.side_effect == tool_pb2.SIDE_EFFECT_SIDE_EFFECTING  # no hints: the safe class
    assert json.loads(echo.output_schema_json) == TEXT_OUTPUT_SCHEMA


async def test_a_call_runs_on_the_mcp_server(bridge, registry):
    response = await invoke(registry, "demo.add", {"a": 2, "b": 40})
    assert response.WhichOneof("outcome") == "result_json", response
    assert json.loads(response.result_json) == {"result": 42}
    assert response.tool_version == "1.0.0"


async def test_text_results_and_the_ledger_apply(bridge, registry):
    first = await invoke(registry, "demo.echo_text", {"text": "hi"}, key="k-1")
    assert json.loads(first.result_json) == {"content": "echo: hi"}
    again = await invoke(registry, "demo.echo_text", {"text": "hi"}, key="k-1")
    assert again.replayed and again.result_json == first.result_json


async def test_bad_arguments_are_refused_by_the_registry(bridge, registry):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await invoke(registry, "demo.add", {"a": "two", "b": 40})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input schema" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as no_key:  # side-effecting: a key first
        await invoke(registry, "demo.echo_text", {"text": "hi"})
    assert no_key.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_mcp_error_result_is_a_tool_error(bridge, registry):
    response = await invoke(registry, "demo.fail", {})
    assert response.WhichOneof("outcome") == "error", response
    assert response.error.code == "EXECUTION_FAILED"
    assert "the disk is full" in response.error.message


async def test_stopping_the_bridge_withdraws_its_endpoint(mesh, registry, server_file):
    bridge = McpBridge(
        name="demo",
        server=McpServer.stdio(stdio_command(server_file)),
        registry_address=mesh.registry,
    )
    await bridge.start()
    try:
        tool = (await registry.GetTool(pb.GetToolRequest(name="demo.add"), timeout=10)).tool
        assert tool.endpoints == [bridge.address]
    finally:
        await bridge.stop()
    tool = (await registry.GetTool(pb.GetToolRequest(name="demo.add"), timeout=10)).tool
    assert list(tool.endpoints) == []


async def test_a_lost_session_is_unavailable_until_it_is_reopened(
    mesh, registry, server_file, eventually
):
    """The MCP server goes away: calls are the mesh's failure (the registry's rules for an
    unavailable backend apply), never a result; once it is back the bridge reconnects."""
    async with http_server(server_file) as url:
        bridge = McpBridge(name="demo", server=McpServer.http(url), registry_address=mesh.registry)
        await bridge.start()
    try:
        # Gone (read-only: the registry may retry it, then says the mesh is unavailable).
        response = await invoke(registry, "demo.add", {"a": 1, "b": 1})
        assert response.WhichOneof("outcome") == "error", response
        assert response.error.code == "MESH_UNAVAILABLE"
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with http_server(server_file, port=port):

            async def answered() -> bool:
                response = await invoke(registry, "demo.add", {"a": 1, "b": 1})
                return response.result_json == '{"result": 2}'

            await eventually(answered, timeout=WAIT_SECONDS, message="the bridge never reconnected")
    finally:
        await bridge.stop()


async def test_a_server_that_does_not_start_is_reported(mesh, tmp_path):
    broken = McpServer.stdio(shlex.join([sys.executable, str(tmp_path / "missing.py")]))
    with pytest.raises(ImportRefused, match="cannot open an MCP session with"):
        await McpBridge(name="demo", server=broken, registry_address=mesh.registry).start()


# --- re-imports: the registry's version rules ----------------------------------------------


async def test_a_changed_server_at_the_same_version_is_refused(mesh, registry, server_file):
    async with McpBridge(
        name="demo",
        server=McpServer.stdio(stdio_command(server_file)),
        registry_address=mesh.registry,
    ):
        changed = McpBridge(
            name="demo",
            server=McpServer.stdio(stdio_command(server_file, "v2")),
            registry_address=mesh.registry,
        )
        with pytest.raises(ImportRefused) as refused:
            await changed.start()
    message = str(refused.value)
    assert "demo.add 1.0.0 is already published with a different contract" in message
    assert "'c' added" in message and "'c' now required" in message
    assert "--version 1.1.0" in message


async def test_a_new_version_goes_through_the_compatibility_checker(mesh, registry, server_file):
    async with McpBridge(
        name="demo",
        server=McpServer.stdio(stdio_command(server_file)),
        registry_address=mesh.registry,
    ):
        with pytest.raises(ImportRefused) as refused:
            await McpBridge(
                name="demo",
                server=McpServer.stdio(stdio_command(server_file, "v2")),
                registry_address=mesh.registry,
                version="1.1.0",
            ).start()
        assert "would break callers of 1.0.0" in str(refused.value)
        async with McpBridge(
            name="demo",
            server=McpServer.stdio(stdio_command(server_file, "v3")),
            registry_address=mesh.registry,
            version="1.1.0",
        ):
            response = await invoke(registry, "demo.add", {"a": 1, "b": 2, "c": 3})
            assert response.tool_version == "1.1.0"
            assert json.loads(response.result_json) == {"result": 6}


# --- the command ---------------------------------------------------------------------------


async def _agentplex(state_file: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentplex.mesh",
        "--state-file",
        str(state_file),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_import_mcp_serves_until_stopped(mesh, registry, server_file, tmp_path, eventually):
    state_file = tmp_path / "mesh.json"
    state_file.write_text(json.dumps({"registry": mesh.registry}))  # a plaintext mesh
    command = stdio_command(server_file)
    bridge = await _agentplex(state_file, "tools", "import-mcp", "demo", "--command", command)
    try:

        async def published() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                request = pb.GetToolRequest(name="demo.add")
                return bool((await registry.GetTool(request, timeout=5)).tool.endpoints)
            return False

        await eventually(published, timeout=WAIT_SECONDS, message="demo.add never published")
        response = await invoke(registry, "demo.add", {"a": 2, "b": 3})
        assert json.loads(response.result_json) == {"result": 5}

        # The same server changed, imported at the same version: refused, saying what changed.
        changed = await _agentplex(
            state_file, "tools", "import-mcp", "demo", "--command", stdio_command(server_file, "v2")
        )
        _, stderr = await asyncio.wait_for(changed.communicate(), WAIT_SECONDS)
        assert changed.returncode == 1, stderr
        assert b"'c' added" in stderr
    finally:
        if bridge.returncode is None:
            bridge.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(bridge.communicate(), WAIT_SECONDS)
    assert bridge.returncode == 0, stderr
    assert b"demo.add 1.0.0: published" in stdout
    tool = (await registry.GetTool(pb.GetToolRequest(name="demo.add"), timeout=10)).tool
    assert list(tool.endpoints) == []
