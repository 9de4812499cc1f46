"""`agentplex mcp serve`: the registry's tools, and the agents as tools, to any MCP client.

An MCP client (an IDE, a desktop assistant, another framework) sees exactly what one
agent of the mesh sees: `tools/list` is the registry's ListTools for that agent, so its
access list and major pins apply, and the `agent.<name>` tools it may delegate to are
among them; `tools/call` is the registry's InvokeTool with that agent as the caller, so
schema validation, argument policies, approvals and the idempotency ledger all apply as
they would to the agent itself. Nothing here decides what a client may do: the registry
does, for the agent the server acts as. An `agent.<name>` call is streamed
(InvokeToolStream), and its sub-task's steps reach a client that asked for progress as
MCP progress notifications.

The tool list is read from the registry on every `tools/list`, never cached here, so a
contract published, deprecated or retired (or an access list changed) shows at the
client's next listing. The MCP SDK's low-level server is used because the tools are data
(a name, a description and JSON Schemas from the registry), not Python functions.

Session: every call is made for one mesh session, `DEFAULT_SESSION` unless `--session`
names another. A fixed session, not one per MCP connection, because an MCP client
usually starts a new connection (a new process, over stdio) every time it starts, and
what the tools keep per session (notes) should still be there then; and because MCP's
newer protocol revisions have no connections to key it on. Clients that must not share
notes run with their own `--session`.

Errors: the registry's refusals (schema-invalid arguments, a tool the agent may not use,
a retired version, a delegation cycle) and a tool's own failure come back as a tool
result with `isError` and a readable message, so the client's model can correct itself;
an unreachable registry too. Only `tools/list` failing is a protocol error, as there is
no result to put it in. The server itself never stops on either.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from agentplex.clients.registry import RegistryClient
from agentplex.contract import agent_tool
from agentplex.runtime.errors import ERROR_DOMAIN, AgentplexError, Unavailable
from agentplex.v1 import step_event_pb2, tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb

if TYPE_CHECKING:
    from mcp.server.context import ServerRequestContext

    from agentplex.runtime.tls import MeshTls

DEFAULT_AGENT = "assistant"
DEFAULT_SESSION = "mcp"
# A call may delegate to an agent, whose sub-task takes as long as it takes; the CLI's
# task commands wait as long.
DEFAULT_CALL_TIMEOUT = 300.0
LIST_TIMEOUT = 10.0
HTTP_PATH = "/mcp"
STARTUP_TIMEOUT = 30.0
GRACEFUL_SHUTDOWN_SECONDS = 5
SERVER_NAME = "agentplex"
# `_meta` keys on tools and results, in the mesh's own namespace (MCP's `prefix/name`).
META_VERSION = f"{ERROR_DOMAIN}/version"
META_STATE = f"{ERROR_DOMAIN}/state"
META_REPLACEMENT = f"{ERROR_DOMAIN}/replacement"
META_REPLAYED = f"{ERROR_DOMAIN}/replayed"
_SESSION_PATTERN = re.compile(agent_tool.SESSION_ID_PATTERN)

_HINTS: dict[int, types.ToolAnnotations] = {
    tool_pb2.SIDE_EFFECT_READ_ONLY: types.ToolAnnotations(read_only_hint=True),
    tool_pb2.SIDE_EFFECT_IDEMPOTENT: types.ToolAnnotations(
        read_only_hint=False, idempotent_hint=True
    ),
    tool_pb2.SIDE_EFFECT_SIDE_EFFECTING: types.ToolAnnotations(
        read_only_hint=False, idempotent_hint=False
    ),
}


@dataclass(frozen=True)
class Caller:
    """Whom the MCP clients act as in the mesh: one agent, in one session."""

    agent: str = DEFAULT_AGENT
    session: str = DEFAULT_SESSION
    call_timeout: float = DEFAULT_CALL_TIMEOUT

    def __post_init__(self) -> None:
        if not self.agent:
            raise ValueError("name the agent whose tools to serve, e.g. assistant")
        if not _SESSION_PATTERN.fullmatch(self.session):
            raise ValueError(
                f"a session id is 1–128 letters, digits or . _ : -, not {self.session!r}"
            )
        if not self.call_timeout > 0:
            raise ValueError("the call timeout must be a positive number of seconds")


Progress = Callable[[int, str], Awaitable[None]]
"""Told each step of a streamed call: how many so far, and what happened."""


class RegistryTools:
    """The registry, as one agent sees it, in MCP's terms."""

    def __init__(self, registry: RegistryClient, caller: Caller) -> None:
        self._registry = registry
        self._caller = caller

    @property
    def caller(self) -> Caller:
        return self._caller

    async def list_tools(self) -> list[types.Tool]:
        """The tools the agent may use, each at the version its pin resolves to.

        Raises AgentplexError when the registry refuses (an unknown agent) or is gone.
        """
        response = await self._registry.list_tools(self._caller.agent, timeout=LIST_TIMEOUT)
        return [mcp_tool(tool) for tool in response.tools]

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        *,
        progress: Progress | None = None,
    ) -> types.CallToolResult:
        """Invoke through the registry as the agent; every failure is an `isError` result.

        With `progress`, the call is streamed (InvokeToolStream: the same checks) and an
        agent tool's sub-task reports each step to it, so a client that asked for
        progress sees a long delegation move rather than a silent wait. The server
        streams every `agent.<name>` call: whether a client asked for progress is only
        known to the SDK's transport (in-process, its callback stands for the token).
        """
        request = pb.InvokeToolRequest(
            tool_name=name,
            arguments_json=json.dumps(dict(arguments or {})),
            # One MCP call, one key: a side-effecting tool requires one, and the
            # ledger then keeps a retry of this very call (inside the registry's
            # routing) from running it twice. MCP gives no key of its own to reuse.
            idempotency_key=f"mcp-{uuid.uuid4().hex}",
            caller=pb.Caller(agent=self._caller.agent, session_id=self._caller.session),
        )
        timeout = self._caller.call_timeout
        try:
            if progress is None:
                response = await self._registry.invoke(request, timeout=timeout)
            else:
                response = await self._streamed(request, progress, timeout=timeout)
        except AgentplexError as exc:
            return error_result(f"{exc.reason}: {exc.message}")
        return call_result(response)

    async def _streamed(
        self, request: pb.InvokeToolRequest, progress: Progress, *, timeout: float
    ) -> pb.InvokeToolResponse:
        steps = 0
        async for item in self._registry.invoke_stream(request, timeout=timeout):
            kind = item.WhichOneof("item")
            if kind == "response":
                return item.response
            message = (
                f"sub-task {item.subtask.task_id} started"
                if kind == "subtask"
                else describe_event(item.event)
            )
            if message:
                steps += 1
                await progress(steps, message)
        raise Unavailable(f"the registry's stream for {request.tool_name} ended without a result")


def describe_event(event: step_event_pb2.StepEvent) -> str:
    """One line for a sub-task's event; "" for those too fine to report (output deltas)."""
    kind = event.WhichOneof("kind")
    if kind in (None, "llm_output_delta"):
        return ""
    who = event.agent or "agent"
    if kind == "tool_call":
        return f"{who}: calling {event.tool_call.tool_name}"
    if kind == "tool_result":
        return f"{who}: {event.tool_result.tool_name} answered"
    if kind == "delegation_started":
        return f"{who}: delegating to {event.delegation_started.agent}"
    return f"{who}: {kind.replace('_', ' ')}"


def mcp_tool(tool: tool_pb2.ToolDefinition) -> types.Tool:
    """A registry contract as an MCP tool: its schemas as they are, its lifecycle in words.

    A deprecated version is still listed (the registry lists it, and calls still run),
    its description saying what to move to; retired versions are never listed.
    """
    description = tool.description
    meta: dict[str, Any] = {
        META_VERSION: tool.version,
        META_STATE: tool_pb2.ToolState.Name(tool.state).removeprefix("TOOL_STATE_").lower(),
    }
    if tool.state == tool_pb2.TOOL_STATE_DEPRECATED:
        description = f"{description} (Deprecated: use {tool.replacement} instead.)"
        meta[META_REPLACEMENT] = tool.replacement
    return types.Tool(
        name=tool.name,
        description=description,
        input_schema=_schema(tool.input_schema_json) or {"type": "object"},
        output_schema=_schema(tool.output_schema_json),
        annotations=_HINTS.get(tool.side_effect),
        _meta=meta,
    )


def _schema(text: str) -> dict[str, Any] | None:
    """A contract's schema if it is an object schema, which is all MCP's older
    revisions allow (the registry's are: results must be JSON objects)."""
    try:
        schema = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    if isinstance(schema, dict) and schema.get("type", "object") == "object":
        return schema
    return None


def call_result(response: pb.InvokeToolResponse) -> types.CallToolResult:
    """An InvokeTool outcome: the result as JSON text and as structured content, or the
    tool's own failure as an error result."""
    meta: dict[str, Any] = {META_VERSION: response.tool_version}
    if response.replayed:
        meta[META_REPLAYED] = True
    notes = [types.TextContent(text=f"warning: {response.warning}")] if response.warning else []
    if response.WhichOneof("outcome") != "result_json":
        error = response.error
        return error_result(
            f"{response.tool_name} failed ({error.code or 'ERROR'}): {error.message}",
            notes=notes,
            meta=meta,
        )
    result = json.loads(response.result_json)
    return types.CallToolResult(
        content=[types.TextContent(text=response.result_json), *notes],
        structured_content=result,
        _meta=meta,
    )


def error_result(
    message: str,
    *,
    notes: list[types.TextContent] | None = None,
    meta: dict[str, Any] | None = None,
) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=message), *(notes or [])], is_error=True, _meta=meta
    )


def build_server(tools: RegistryTools) -> Server[Any]:
    """The MCP server: the two tool methods, answered from the registry per request."""

    async def on_list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        try:
            listed = await tools.list_tools()
        except AgentplexError as exc:
            raise MCPError(
                types.INTERNAL_ERROR,
                f"cannot list the tools of agent {tools.caller.agent!r}: "
                f"{exc.reason}: {exc.message}",
            ) from None
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if not agent_tool.is_agent_tool(params.name):
            return await tools.call_tool(params.name, params.arguments)

        async def progress(steps: int, message: str) -> None:
            # A no-op unless the client asked for progress (a progress token).
            await ctx.session.report_progress(steps, message=message)

        return await tools.call_tool(params.name, params.arguments, progress=progress)

    return Server(
        SERVER_NAME,
        version=_version(),
        description=f"the agentplex mesh's tools, as agent {tools.caller.agent!r} may use them",
        instructions=(
            f"Tools of an agentplex mesh, as its agent {tools.caller.agent!r} may use them; "
            "agent.<name> tools delegate a task to that agent and return its answer."
        ),
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
    )


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("agentplex")
    except metadata.PackageNotFoundError:
        return ""


@asynccontextmanager
async def registry_tools(
    registry_address: str, caller: Caller, *, tls: MeshTls | None = None
) -> AsyncIterator[RegistryTools]:
    """The registry at `registry_address` as `caller` sees it, checked once: the agent
    must be known (else NotFound) and the registry reachable (else Unavailable), so a
    misconfigured server fails when it starts rather than at a client's first call."""
    registry = RegistryClient(registry_address, tls=tls)
    try:
        tools = RegistryTools(registry, caller)
        await tools.list_tools()
        yield tools
    finally:
        await registry.close()


async def serve_stdio(tools: RegistryTools) -> None:
    """Serve one MCP client over this process's stdin and stdout, until stdin closes.

    While it serves, the SDK points fd 1 at stderr: stray output cannot corrupt the
    protocol on stdout.
    """
    server = build_server(tools)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


@dataclass
class HttpServing:
    """A streamable-HTTP MCP server that is listening: its URL, and how to stop it."""

    url: str
    _stop: Callable[[], None]
    _done: asyncio.Task[None]

    def stop(self) -> None:
        self._stop()

    async def wait(self) -> None:
        """Until the server stops (stop(), or SIGINT/SIGTERM when serving from the main
        thread: uvicorn turns them into a graceful stop and raises them again after)."""
        await asyncio.shield(self._done)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, saying when it has started (it has no hook of its own)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:  # uvicorn sets it, and returns, when the app failed to start
            self.listening.set()


@asynccontextmanager
async def serve_http(
    tools: RegistryTools, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[HttpServing]:
    """Serve MCP's streamable HTTP transport at http://HOST:PORT/mcp (port 0: a free one).

    The socket is bound here, before the server starts, so the URL yielded is the real
    one; leaving the block stops the server gracefully. On loopback the SDK also checks
    Host and Origin headers (DNS rebinding protection).
    """
    app = build_server(tools).streamable_http_app(streamable_http_path=HTTP_PATH, host=host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    # Bounded: MCP clients hold an event stream open, which would otherwise keep a
    # stopping server waiting for them forever.
    server = _Uvicorn(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    )
    done = asyncio.create_task(server.serve(sockets=[sock]))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    serving = HttpServing(
        url=f"http://{shown}:{bound_port}{HTTP_PATH}",
        _stop=lambda: setattr(server, "should_exit", True),
        _done=done,
    )
    try:
        # Listening already (connections queue in the backlog); wait for the app's own
        # start-up, bounded, so a failure to start is raised here rather than hanging.
        started = asyncio.create_task(server.listening.wait())
        try:
            await asyncio.wait(
                [started, done], timeout=STARTUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            started.cancel()
        if not server.listening.is_set() and not done.done():
            raise TimeoutError(f"the MCP HTTP server did not start within {STARTUP_TIMEOUT:.0f}s")
        if done.done() or server.should_exit:
            if done.done():
                done.result()
            raise RuntimeError("the MCP HTTP server stopped while starting")
        yield serving
    finally:
        server.should_exit = True
        try:
            await done
        finally:
            sock.close()
