"""`agentplex mcp serve`: the registry's tools, as one agent sees them, to MCP clients.

Every test talks to the server with the MCP SDK's own client — over stdio to the real
command, over streamable HTTP, or in-process — against the in-process mesh (`mesh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import mcp_types as types
import pytest
from mcp import Client, MCPError, StdioServerParameters

from agentplex.clients.registry import RegistryClient
from agentplex.interop import mcp_server
from agentplex.interop.mcp_server import Caller
from agentplex.v1 import tool_pb2

# Generous bounds: a subprocess has to import the mesh's modules first.
CALL_TIMEOUT = 60.0
TEST_TIMEOUT = 120.0
ASSISTANT_TOOLS = {"calculator", "notes.read", "notes.write"}


def serve_command(*args: str) -> list[str]:
    return ["-m", "agentplex.mesh", "mcp", "serve", *args]


@contextlib.asynccontextmanager
async def in_process(registry: str, caller: Caller) -> AsyncIterator[Client]:
    """The MCP server built on the registry, with an SDK client connected in-process."""
    async with (
        mcp_server.registry_tools(registry, caller) as tools,
        Client(mcp_server.build_server(tools), read_timeout_seconds=CALL_TIMEOUT) as client,
    ):
        yield client


def text_of(result: types.CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def check_calculator(client: Client) -> None:
    result = await client.call_tool("calculator", {"expression": "2**10"})
    assert not result.is_error, text_of(result)
    assert result.structured_content == {"expression": "2**10", "result": 1024}
    assert json.loads(text_of(result)) == {"expression": "2**10", "result": 1024}


async def test_over_stdio_an_agents_tools_are_listed_and_called(mesh) -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=serve_command("--registry", mesh.registry, "--agent", "assistant"),
        env=dict(os.environ),
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        Client(server, read_timeout_seconds=CALL_TIMEOUT) as client,
    ):
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        # The assistant's access list, nothing else: docs.search is the researcher's.
        assert set(listed) == ASSISTANT_TOOLS
        calculator = listed["calculator"]
        assert "expression" in calculator.input_schema["properties"]
        assert calculator.output_schema is not None
        assert calculator.annotations is not None and calculator.annotations.read_only_hint

        await check_calculator(client)

        bad = await client.call_tool("calculator", {"expr": "2**10"})
        assert bad.is_error
        assert "INVALID_ARGUMENT" in text_of(bad)
        assert "input schema" in text_of(bad), text_of(bad)

        refused = await client.call_tool("docs.search", {"query": "gateway"})
        assert refused.is_error
        assert "TOOL_NOT_ALLOWED" in text_of(refused), text_of(refused)

        # Still serving after the errors.
        await check_calculator(client)


async def test_over_streamable_http_in_process(mesh) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        mcp_server.registry_tools(mesh.registry, Caller()) as tools,
        mcp_server.serve_http(tools, port=0) as http,
    ):
        assert http.url.startswith("http://127.0.0.1:") and http.url.endswith("/mcp")
        assert not http.url.endswith(":0/mcp")
        async with Client(http.url, read_timeout_seconds=CALL_TIMEOUT) as client:
            assert {tool.name for tool in (await client.list_tools()).tools} == ASSISTANT_TOOLS
            await check_calculator(client)


async def test_the_command_over_http_prints_where_it_listens(mesh) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *serve_command("--registry", mesh.registry, "--transport", "http", "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            assert process.stderr is not None
            line = await process.stderr.readline()
            if not line.startswith(b"{"):  # a failure: show all of it
                raise AssertionError((line + await process.stderr.read()).decode())
            serving = json.loads(line)
            assert serving["transport"] == "http"
            assert (serving["agent"], serving["session"]) == ("assistant", "mcp")
            async with Client(serving["url"], read_timeout_seconds=CALL_TIMEOUT) as client:
                assert {t.name for t in (await client.list_tools()).tools} == ASSISTANT_TOOLS
                await check_calculator(client)
            process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop
            assert await process.wait() == 130  # the CLI's exit code for an interrupt
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def usage_error(*args: str) -> bytes:
    """Runs `mcp serve ARGS`, which must refuse with exit 2, nothing on stdout and one
    line on stderr; returns that line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *serve_command(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(TEST_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode == 2
    assert out == b""
    assert len(err.decode().strip().splitlines()) == 1
    return err


async def test_an_agent_the_registry_does_not_know_is_a_usage_error(mesh) -> None:
    assert b"nobody" in await usage_error("--registry", mesh.registry, "--agent", "nobody")


async def test_an_agent_tool_delegates_a_task_and_reports_its_progress(mesh, workers) -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        mcp_server.registry_tools(mesh.registry, Caller(agent="supervisor")) as tools,
        mcp_server.serve_http(tools) as http,
        Client(http.url, read_timeout_seconds=CALL_TIMEOUT) as client,
    ):
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert {"agent.assistant", "agent.researcher"} <= set(listed)
        assert "calculator" not in listed
        assert listed["agent.assistant"].input_schema["required"] == ["prompt"]

        result = await client.call_tool("agent.assistant", {"prompt": "what is 2**10?"})
        assert not result.is_error, text_of(result)
        assert isinstance(result.structured_content, dict)
        assert "1024" in result.structured_content["output"]
        assert result.structured_content["error"] == ""

        # A client that asks for progress is told the sub-task's steps as they happen.
        reported: list[tuple[float, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            reported.append((progress, message))

        streamed = await client.call_tool(
            "agent.assistant", {"prompt": "what is 3**4?"}, progress_callback=on_progress
        )
        assert not streamed.is_error, text_of(streamed)
        assert isinstance(streamed.structured_content, dict)
        assert "81" in streamed.structured_content["output"]
        messages = [message or "" for _, message in reported]
        assert messages[0].startswith("sub-task "), messages
        assert "assistant: calling calculator" in messages, messages
        assert [progress for progress, _ in reported] == list(range(1, len(reported) + 1))


async def test_notes_are_kept_per_session(mesh) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with in_process(mesh.registry, Caller(session="mcp-a")) as client:
            wrote = await client.call_tool("notes.write", {"text": "deploy on Friday"})
            assert not wrote.is_error, text_of(wrote)
        async with in_process(mesh.registry, Caller(session="mcp-a")) as client:
            read = await client.call_tool("notes.read", {})
            assert "deploy on Friday" in text_of(read)
        async with in_process(mesh.registry, Caller(session="mcp-b")) as client:
            read = await client.call_tool("notes.read", {})
            assert not read.is_error, text_of(read)
            assert "deploy on Friday" not in text_of(read)


async def test_a_lost_registry_is_an_error_result_then_a_list_error() -> None:
    registry = RegistryClient("127.0.0.1:1")  # nothing listens there
    try:
        tools = mcp_server.RegistryTools(registry, Caller(call_timeout=10))
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            Client(mcp_server.build_server(tools), read_timeout_seconds=CALL_TIMEOUT) as client,
        ):
            result = await client.call_tool("calculator", {"expression": "1+1"})
            assert result.is_error
            assert "UNAVAILABLE" in text_of(result), text_of(result)
            with pytest.raises(MCPError, match="cannot list the tools of agent 'assistant'"):
                await client.list_tools()
    finally:
        await registry.close()


def test_a_deprecated_version_says_what_to_use_instead() -> None:
    tool = mcp_server.mcp_tool(
        tool_pb2.ToolDefinition(
            name="calc",
            version="1.2.0",
            description="Evaluates arithmetic.",
            input_schema_json='{"type": "object"}',
            output_schema_json='{"type": "object"}',
            side_effect=tool_pb2.SIDE_EFFECT_SIDE_EFFECTING,
            state=tool_pb2.TOOL_STATE_DEPRECATED,
            replacement="calc@2",
        )
    )
    assert tool.description == "Evaluates arithmetic. (Deprecated: use calc@2 instead.)"
    assert tool.meta is not None
    assert tool.meta["agentplex.dev/replacement"] == "calc@2"
    assert tool.meta["agentplex.dev/state"] == "deprecated"
    assert tool.annotations == types.ToolAnnotations(read_only_hint=False, idempotent_hint=False)


@pytest.mark.parametrize("session", ["", "has space", "x" * 129])
def test_a_session_id_must_be_one_the_mesh_accepts(session: str) -> None:
    with pytest.raises(ValueError, match="session id"):
        Caller(session=session)


async def test_listening_beyond_loopback_needs_to_be_asked_for(mesh) -> None:
    args = ("--registry", mesh.registry, "--transport", "http", "--host", "0.0.0.0")
    assert b"--allow-remote" in await usage_error(*args)
