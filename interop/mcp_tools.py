"""MCP tool servers as versioned tools in the registry: `agentplex tools import-mcp`.

An MCP server's tools become contracts like any other backend's, so everything
the registry does for a call — access lists, argument validation against the
input schema, argument policies, the idempotency ledger, retries by side
effect, result validation against the output schema — happens before and after
the MCP server runs. The MCP server itself is never reachable from the mesh:
a bridge holds one MCP client session to it (the `mcp` SDK's client, over stdio
or streamable HTTP) and serves `ToolExecutorService`, with mTLS for the registry alone.

Mapping, per tool (`McpTool` → `definition`):

* name: `<server>.<tool>`, the MCP name in the registry's lowercase dotted
  words (`getWeather` on `weather` → `weather.get_weather`);
* input schema: the MCP `inputSchema`, as is;
* output schema: the MCP `outputSchema` when the tool declares one (the result
  is then its `structuredContent`), else `{"content": string}`, the text blocks
  of the result joined, so the result always fits the contract the registry
  checks it against;
* side effect: from the MCP annotations (`readOnlyHint` → read-only,
  `idempotentHint` → idempotent), else side-effecting: without a hint the
  registry must assume a call may change something every time, so it demands
  an idempotency key and never repeats a call that may have run.

Failures: an MCP result with `isError` is the tool's answer, a `ToolError`
the model reads (`EXECUTION_FAILED`), as is a JSON-RPC error the server
returns for the call (a request timeout is `TIMEOUT`). A lost MCP session is
the mesh's failure, not the tool's: UNAVAILABLE, with
`BACKEND_DEPENDENCY_UNAVAILABLE` when nothing was sent (so the registry may
give the idempotency key back), and plain
UNAVAILABLE when the call was under way (it may have run: the registry
applies its rules for side effects). A lost session is reopened in the
background, with backoff.

Versions: every tool is published at the bridge's `version`. The registry's
rules decide what a re-import may do: the same contract again adds this
bridge as one more backend; a changed contract at the same version is refused
(`ImportRefused` names what changed); a new minor version goes through the
registry's compatibility checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp import types as mcp_types
from mcp.client.streamable_http import streamable_http_client

from agentplex.clients.registry import RegistryClient
from agentplex.contract import callers
from agentplex.contract.access import ACCESS
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.runtime.clients import call_with_deadline, open_channel
from agentplex.runtime.errors import AgentplexError, FailedPrecondition, NotFound, Unavailable
from agentplex.runtime.process import Endpoint
from agentplex.runtime.server import ServiceHost
from agentplex.v1 import tool_executor_service_pb2 as pb
from agentplex.v1 import tool_executor_service_pb2_grpc as pb_grpc
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as registry_pb
from agentplex.v1 import tool_registry_service_pb2_grpc as registry_grpc

if TYPE_CHECKING:
    from agentplex.runtime.tls import MeshTls, TlsFiles

log = logging.getLogger(__name__)

DEFAULT_VERSION = "1.0.0"
# Pages of `tools/list` followed at most (MCP servers page by their own page size).
MAX_TOOL_PAGES = 100
REGISTRY_TIMEOUT_SECONDS = 10.0
# Opening the MCP session: starting the server process, or reaching the URL, and
# the initialize handshake. A server slower than this is reported, not waited on.
CONNECT_SECONDS = 30.0
# Closing the MCP session (the stdio server is asked to exit, then terminated).
CLOSE_SECONDS = 10.0
# Reopening a lost session: first wait, and the most any wait grows to.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0
# How often an idle session is pinged, so a server that went away is noticed
# (and reopened) before a call finds out.
PING_SECONDS = 5.0

# The registry's tool names: dotted lowercase words joined by single underscores.
_WORD = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
SERVER_NAME_PATTERN = re.compile(rf"^{_WORD}(?:\.{_WORD})*$")
TEXT_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "content": {
            "type": "string",
            "description": "The tool's result: the text of what the MCP server returned.",
        }
    },
    "required": ["content"],
}


class ImportRefused(Exception):
    """The MCP server's tools cannot be published as asked; the message says why and
    what to do instead."""


class SessionLost(Exception):
    """The MCP session ended (the server exited, or its URL stopped answering)."""


# --- the servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class McpServer:
    """Where the MCP server is: a command run as a subprocess speaking stdio, or the
    URL of a streamable-HTTP endpoint. Exactly one is set."""

    command: tuple[str, ...] = ()
    url: str = ""

    @classmethod
    def stdio(cls, command_line: str) -> McpServer:
        """A shell-like command line ("npx -y some-server --flag"), split as a shell would."""
        try:
            words = tuple(shlex.split(command_line))
        except ValueError as exc:
            raise ImportRefused(f"cannot split the command {command_line!r}: {exc}") from None
        if not words:
            raise ImportRefused("the MCP server's command is empty")
        return cls(command=words)

    @classmethod
    def http(cls, url: str) -> McpServer:
        if not url.startswith(("http://", "https://")):
            raise ImportRefused(f"the MCP server's URL must be http:// or https://, not {url!r}")
        return cls(url=url)

    def __str__(self) -> str:
        """For messages and logs: a URL without credentials or query, a command's
        program and argument count only (either may carry a secret)."""
        if self.url:
            parts = urllib.parse.urlsplit(self.url)
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        extra = len(self.command) - 1
        return self.command[0] + (f" (+{extra} arguments)" if extra else "")

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[ClientSession]:
        """An initialized MCP client session; closed (the stdio server ended) on exit.

        The stdio server inherits this process's environment: the bridge runs in
        the operator's shell, like the server would if they started it there.
        """
        async with contextlib.AsyncExitStack() as stack:
            if self.url:
                read, write = await stack.enter_async_context(streamable_http_client(self.url))
            else:
                parameters = StdioServerParameters(
                    command=self.command[0], args=list(self.command[1:]), env=dict(os.environ)
                )
                read, write = await stack.enter_async_context(stdio_client(parameters))
            session = await stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            yield session


# --- the mapping -----------------------------------------------------------------------


@dataclass(frozen=True)
class McpTool:
    """What the bridge uses of an MCP tool's description (`mcp.types.Tool`)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    read_only: bool | None = None
    idempotent: bool | None = None

    @classmethod
    def of(cls, tool: mcp_types.Tool) -> McpTool:
        hints = tool.annotations
        return cls(
            name=tool.name,
            description=tool.description or tool.title or "",
            input_schema=dict(tool.input_schema),
            output_schema=dict(tool.output_schema) if tool.output_schema is not None else None,
            read_only=hints.read_only_hint if hints else None,
            idempotent=hints.idempotent_hint if hints else None,
        )

    @property
    def structured(self) -> bool:
        """Results are the structured content, the declared output schema their contract."""
        return self.output_schema is not None

    @property
    def wrapped(self) -> bool:
        """The declared output schema is not an object's (any JSON Schema may be, from
        MCP 2026-07-28): results are then `{"result": <structured content>}`, since a
        registry contract's result is an object."""
        return self.output_schema is not None and self.output_schema.get("type") != "object"


def tool_name(server: str, mcp_name: str) -> str:
    """`<server>.<tool>` in the registry's words: camelCase and any punctuation become
    single underscores, lowercase (`getWeather`, `get-weather` → `get_weather`)."""
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", mcp_name)
    words = [w for w in re.split(r"[^a-z0-9]+", snake.lower()) if w]
    if not words:
        raise ImportRefused(f"the MCP tool name {mcp_name!r} has no letters or digits to keep")
    if not words[0][0].isalpha():
        words.insert(0, "tool")
    return f"{server}.{'_'.join(words)}"


def side_effect(tool: McpTool) -> tool_pb2.SideEffect:
    """The registry's side-effect class from the MCP annotations.

    MCP's `destructiveHint` has no class of its own: a destructive tool that is
    not idempotent changes something on every call (side-effecting), one that is
    idempotent changes nothing more when repeated (idempotent).
    """
    if tool.read_only:
        return tool_pb2.SIDE_EFFECT_READ_ONLY
    if tool.idempotent:
        return tool_pb2.SIDE_EFFECT_IDEMPOTENT
    return tool_pb2.SIDE_EFFECT_SIDE_EFFECTING


def output_schema(tool: McpTool) -> dict[str, Any]:
    """The declared `outputSchema` (results are its structured content), or the text
    wrapper every other result is returned in."""
    if tool.output_schema is None:
        return TEXT_OUTPUT_SCHEMA
    if tool.wrapped:
        return {
            "type": "object",
            "properties": {"result": tool.output_schema},
            "required": ["result"],
        }
    return tool.output_schema


def definition(server: str, version: str, tool: McpTool) -> tool_pb2.ToolDefinition:
    """The contract the registry publishes for one MCP tool (without an endpoint)."""
    input_schema = tool.input_schema or {"type": "object"}
    return tool_pb2.ToolDefinition(
        name=tool_name(server, tool.name),
        version=version,
        description=tool.description.strip() or f"The {tool.name} tool of the {server} MCP server.",
        input_schema_json=json.dumps(input_schema, sort_keys=True),
        output_schema_json=json.dumps(output_schema(tool), sort_keys=True),
        side_effect=side_effect(tool),
        backend_kind=tool_pb2.BACKEND_KIND_EXECUTOR,
    )


def contract_changes(published: tool_pb2.ToolDefinition, new: tool_pb2.ToolDefinition) -> list[str]:
    """What differs between two contracts of one version, in words an operator acts on."""
    changes: list[str] = []
    if published.description != new.description:
        changes.append("description changed")
    for label, old_json, new_json in (
        ("input schema", published.input_schema_json, new.input_schema_json),
        ("output schema", published.output_schema_json, new.output_schema_json),
    ):
        old, now = json.loads(old_json), json.loads(new_json)
        if old != now:
            changes.append(f"{label} changed ({_schema_difference(old, now)})")
    if published.side_effect != new.side_effect:
        changes.append(
            f"side effect {_side_effect_word(published.side_effect)} → "
            f"{_side_effect_word(new.side_effect)}"
        )
    return changes


def _schema_difference(old: Any, new: Any) -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "replaced"
    old_props, new_props = old.get("properties") or {}, new.get("properties") or {}
    parts = [f"property {p!r} added" for p in new_props if p not in old_props]
    parts += [f"property {p!r} removed" for p in old_props if p not in new_props]
    parts += [
        f"property {p!r} changed"
        for p in new_props
        if p in old_props and old_props[p] != new_props[p]
    ]
    old_required, new_required = set(old.get("required") or ()), set(new.get("required") or ())
    parts += [f"{p!r} now required" for p in sorted(new_required - old_required)]
    parts += [f"{p!r} no longer required" for p in sorted(old_required - new_required)]
    other = sorted(k for k in {*old, *new} - {"properties", "required"} if old.get(k) != new.get(k))
    parts += [f"{k!r} changed" for k in other]
    return ", ".join(parts) or "reordered"


def _side_effect_word(value: int) -> str:
    return tool_pb2.SideEffect.Name(value).removeprefix("SIDE_EFFECT_").lower()


def result_of(tool: McpTool, result: mcp_types.CallToolResult) -> pb.ExecuteToolResponse:
    """An MCP `CallToolResult` as the executor's answer."""
    if result.is_error:
        return _tool_error(
            ToolErrorCode.EXECUTION_FAILED, _text(result.content) or f"{tool.name} failed"
        )
    if not tool.structured:
        return pb.ExecuteToolResponse(result_json=json.dumps({"content": _text(result.content)}))
    structured = result.structured_content
    if tool.wrapped:
        structured = {"result": structured}
    if not isinstance(structured, dict):
        return _tool_error(
            ToolErrorCode.INVALID_RESULT,
            f"{tool.name} declares an output schema but returned no structured content",
        )
    try:
        return pb.ExecuteToolResponse(result_json=json.dumps(structured, allow_nan=False))
    except (TypeError, ValueError) as exc:
        return _tool_error(ToolErrorCode.INVALID_RESULT, f"result is not JSON: {exc}")


def _tool_error(code: str, message: str) -> pb.ExecuteToolResponse:
    return pb.ExecuteToolResponse(error=tool_pb2.ToolError(code=code, message=message))


def _text(blocks: Sequence[mcp_types.ContentBlock]) -> str:
    """Text blocks as they are; any other block as a short note of what it was (the
    registry's results are JSON text, and models read them)."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, mcp_types.TextResourceContents):
                parts.append(resource.text)
            else:
                parts.append(f"[resource {resource.uri} ({resource.mime_type or 'binary'})]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        else:  # image, audio
            parts.append(f"[{block.type} ({block.mime_type})]")
    return "\n".join(parts)


# --- the session and the executor ------------------------------------------------------


@dataclass
class McpConnection:
    """One MCP client session, kept open (and reopened when lost) by its own task.

    The SDK's session lives in anyio task groups that must be entered and left
    by one task, so a single task owns it; calls from gRPC handlers go through
    `call`, which says UNAVAILABLE while no session is open.
    """

    server: McpServer
    tools: dict[str, McpTool] = field(default_factory=dict)
    _session: ClientSession | None = field(default=None, init=False)
    _lost: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def open(self) -> None:
        """Open the first session and list the tools; raises ImportRefused when the server
        cannot be reached (at start, a failure is the operator's to fix, not to retry)."""
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._keep(opened), name="mcp-session")
        try:
            await asyncio.wait_for(asyncio.shield(opened), CONNECT_SECONDS)
        except TimeoutError:
            await self.close()
            raise ImportRefused(
                f"the MCP server {self.server} did not answer within {CONNECT_SECONDS:.0f}s"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def _keep(self, opened: asyncio.Future[None]) -> None:
        delay = RECONNECT_FIRST_SECONDS
        while not self._stop.is_set():
            try:
                async with self.server.session() as session:
                    listed = await _list_tools(session)
                    if not opened.done():
                        self.tools = listed
                        opened.set_result(None)
                    elif listed != self.tools:
                        log.error(
                            "the MCP server %s now lists other tools than were published; "
                            "import it again to publish them",
                            self.server,
                        )
                    self._session, delay = session, RECONNECT_FIRST_SECONDS
                    self._lost.clear()
                    log.info("MCP session open", extra={"server": str(self.server)})
                    await self._until_lost_or_stopped(session)
            except Exception as exc:
                if not opened.done():
                    hint = (
                        " (the command's own output, above, may say why)"
                        if self.server.command
                        else ""
                    )
                    opened.set_exception(
                        ImportRefused(
                            f"cannot open an MCP session with {self.server}: {_describe(exc)}{hint}"
                        )
                    )
                    return
                log.warning("MCP session with %s lost: %s", self.server, _describe(exc))
            finally:
                self._session = None
            if self._stop.is_set():
                return
            log.info("reopening the MCP session with %s in %.1fs", self.server, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _until_lost_or_stopped(self, session: ClientSession) -> None:
        """Wait for a stop or a loss (a failed call, or an unanswered ping)."""
        while not self._stop.is_set() and not self._lost.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, self._lost)]
            try:
                await asyncio.wait(waits, timeout=PING_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if self._stop.is_set() or self._lost.is_set():
                return
            try:
                await asyncio.wait_for(session.send_ping(), PING_SECONDS)
            except Exception as exc:
                raise SessionLost(f"ping unanswered: {_describe(exc)}") from exc

    async def call(
        self, tool: McpTool, arguments: dict[str, Any], timeout: float | None
    ) -> pb.ExecuteToolResponse:
        """Run one `tools/call`; the answer, or UNAVAILABLE when the session is (or gets)
        lost. `timeout`: the registry's deadline, so an MCP request never outlives it."""
        session = self._session
        if session is None or self._lost.is_set():
            # Nothing was sent: a retry under the same key duplicates nothing.
            raise Unavailable(
                f"the MCP server {self.server} is not connected (reconnecting)",
                reason=Reason.BACKEND_DEPENDENCY_UNAVAILABLE,
            )
        try:
            result = await session.call_tool(tool.name, arguments, read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                # Out of time, not the tool's answer: the registry's TIMEOUT rules
                # (a side-effecting call keeps its key; it may have run).
                return _tool_error(
                    ToolErrorCode.TIMEOUT, f"{tool.name} did not answer in time: {exc.message}"
                )
            if exc.code != mcp_types.CONNECTION_CLOSED:
                # The server's own answer (an unknown tool, invalid params): the
                # call was refused, and the model reads why.
                return _tool_error(
                    ToolErrorCode.EXECUTION_FAILED, f"the MCP server answered: {exc.message}"
                )
            self._lose(session)
            raise Unavailable(
                f"the MCP session with {self.server} closed during the call; it may have run"
            ) from exc
        except (RuntimeError, ValueError) as exc:
            # The SDK's checks of the answer: structured content outside the tool's
            # own output schema, a result shape the bridge cannot use (a pydantic
            # ValidationError is a ValueError).
            return _tool_error(ToolErrorCode.INVALID_RESULT, f"{tool.name}: {_describe(exc)}")
        except Exception as exc:  # the transport failed (a broken pipe, an HTTP error)
            self._lose(session)
            raise Unavailable(
                f"the MCP session with {self.server} failed during the call "
                f"({_describe(exc)}); it may have run"
            ) from exc
        return result_of(tool, result)

    def _lose(self, session: ClientSession) -> None:
        """Mark the session lost, unless a new one already replaced it: a late failure of
        an old call must not tear down a fresh session."""
        if self._session is session:
            self._lost.set()

    async def close(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(task, CLOSE_SECONDS)
        except TimeoutError:
            log.warning("the MCP session with %s did not close in time", self.server)
        except Exception:
            log.debug("the MCP session task failed", exc_info=True)


def _describe(exc: BaseException) -> str:
    """What went wrong, in words: the SDK's task groups wrap the failure that matters
    (a process that exited, a refused connection) in exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_describe(inner) for inner in exc.exceptions))
    return str(exc) or type(exc).__name__


async def _list_tools(session: ClientSession) -> dict[str, McpTool]:
    """Every tool the server lists, following its pages (a bounded number: a server
    whose cursor never ends is refused, not followed forever)."""
    tools: dict[str, McpTool] = {}
    params: mcp_types.PaginatedRequestParams | None = None
    for _ in range(MAX_TOOL_PAGES):
        page = await session.list_tools(params=params)
        for tool in page.tools:
            tools[tool.name] = McpTool.of(tool)
        if not page.next_cursor:
            return tools
        params = mcp_types.PaginatedRequestParams(cursor=page.next_cursor)
    raise ImportRefused(f"the MCP server listed more than {MAX_TOOL_PAGES} pages of tools")


class McpToolExecutor(pb_grpc.ToolExecutorServiceServicer):
    """Runs the registry's calls of `<server>.<tool>` as MCP `tools/call`s.

    The registry has already checked access and validated the arguments, so
    they go to the MCP server as they are.
    """

    def __init__(self, connection: McpConnection, tools: dict[str, McpTool], version: str) -> None:
        self._connection = connection
        self._tools = tools  # by registry name
        self._major = _major(version)

    async def ExecuteTool(
        self,
        request: pb.ExecuteToolRequest,
        context: grpc.aio.ServicerContext[pb.ExecuteToolRequest, pb.ExecuteToolResponse],
    ) -> pb.ExecuteToolResponse:
        tool = self._tools.get(request.tool_name)
        if tool is None or _major(request.tool_version) != self._major:
            raise NotFound(
                f"this MCP bridge does not serve {request.tool_name} {request.tool_version}",
                reason=Reason.TOOL_NOT_SERVED,
            )
        left: float | None = context.time_remaining()  # None: the caller set no deadline
        return await self._connection.call(
            tool, json.loads(request.arguments_json or "{}"), timeout=left
        )


def _major(version: str) -> str:
    return version.split(".", 1)[0]


# --- the bridge ------------------------------------------------------------------------


@dataclass
class McpBridge:
    """An MCP server's tools, served to the registry and published in it while open."""

    name: str
    server: McpServer
    registry_address: str
    version: str = DEFAULT_VERSION
    host: str = "127.0.0.1"
    port: int = 0
    # Credentials to call the registry (the `cli` identity's) and to serve with (the
    # `tools` identity's, which the registry checks when it calls a backend); None
    # for a mesh without mTLS.
    registry_tls: MeshTls | None = None
    serve_tls: TlsFiles | None = None
    definitions: list[tool_pb2.ToolDefinition] = field(default_factory=list, init=False)
    address: str = field(default="", init=False)
    _connection: McpConnection | None = field(default=None, init=False)
    _host: ServiceHost | None = field(default=None, init=False)
    _channel: grpc.aio.Channel | None = field(default=None, init=False)
    _published: list[tool_pb2.ToolDefinition] = field(default_factory=list, init=False)

    async def start(self) -> str:
        """Connect, serve, publish; the address the registry calls. On any failure
        whatever was done is undone and the error raised (ImportRefused: the reason
        in words)."""
        if not SERVER_NAME_PATTERN.fullmatch(self.name):
            raise ImportRefused(
                f"the name {self.name!r} must be lowercase dotted words, e.g. 'github' or "
                "'acme.files': it prefixes every tool's name"
            )
        try:
            self._connection = McpConnection(self.server)
            await self._connection.open()
            by_name = self._definitions(self._connection.tools)
            self._channel = open_channel(
                self.registry_address, tls=self.registry_tls, server_identity=callers.REGISTRY
            )
            executor = McpToolExecutor(self._connection, by_name, self.version)

            def register(server: grpc.aio.Server) -> list[str]:
                pb_grpc.add_ToolExecutorServiceServicer_to_server(executor, server)
                return [callers.TOOL_EXECUTOR_SERVICE]

            self._host = ServiceHost(
                name=f"mcp-bridge {self.name}",
                register=register,
                host=self.host,
                port=self.port,
                metrics_port=None,
                grace_seconds=5.0,
                on_start=[self._publish],
                tls=self.serve_tls,
                access=ACCESS,
            )
            self.address = (await self._host.start()).address
        except BaseException:
            await self.stop()
            raise
        return self.address

    def _definitions(self, tools: dict[str, McpTool]) -> dict[str, McpTool]:
        by_name: dict[str, McpTool] = {}
        self.definitions = []
        for tool in tools.values():
            defined = definition(self.name, self.version, tool)
            clash = by_name.get(defined.name)
            if clash is not None:
                raise ImportRefused(
                    f"the MCP tools {clash.name!r} and {tool.name!r} would both be "
                    f"{defined.name}: the registry's names are lowercase words"
                )
            by_name[defined.name] = tool
            self.definitions.append(defined)
        if not self.definitions:
            raise ImportRefused(f"the MCP server {self.server} lists no tools")
        return by_name

    async def _publish(self, endpoint: Endpoint) -> None:
        assert self._channel is not None
        self.address = endpoint.address  # before the first publication: `stop` withdraws it
        registry = RegistryClient(self.registry_address, channel=self._channel)
        for defined in self.definitions:
            published = tool_pb2.ToolDefinition()
            published.CopyFrom(defined)
            published.endpoint = endpoint.address
            try:
                await registry.register(published, timeout=REGISTRY_TIMEOUT_SECONDS)
            except FailedPrecondition as exc:
                raise ImportRefused(await self._refusal(defined, exc)) from None
            except AgentplexError as exc:
                raise ImportRefused(
                    f"the registry at {self.registry_address} refused {defined.name} "
                    f"{defined.version}: {exc.message}"
                ) from None
            self._published.append(published)
            log.info(
                "published",
                extra={
                    "tool": defined.name,
                    "version": defined.version,
                    "endpoint": endpoint.address,
                },
            )

    async def _refusal(self, defined: tool_pb2.ToolDefinition, exc: FailedPrecondition) -> str:
        """The registry's refusal, with what changed when the version exists already."""
        if exc.reason != Reason.VERSION_EXISTS:
            return f"{exc.message} (choose the version with --version)"
        assert self._channel is not None
        stub = registry_grpc.ToolRegistryServiceStub(self._channel)
        try:
            response = await call_with_deadline(
                stub.GetTool,
                registry_pb.GetToolRequest(name=defined.name, version=defined.version),
                timeout=REGISTRY_TIMEOUT_SECONDS,
            )
        except AgentplexError:
            return exc.message
        changes = contract_changes(response.tool, defined) or ["the contract changed"]
        major, minor, _ = (int(p) for p in defined.version.split("."))
        return (
            f"{defined.name} {defined.version} is already published with a different "
            f"contract: {'; '.join(changes)}. Versions are immutable: import it as "
            f"--version {major}.{minor + 1}.0 (a compatible change) or "
            f"{major + 1}.0.0 (a breaking one)"
        )

    async def stop(self) -> None:
        """Withdraw this bridge's endpoint, stop serving, close the MCP session.
        Safe to call more than once, and after a failed start."""
        if self._channel is not None and self._published:
            registry = RegistryClient(self.registry_address, channel=self._channel)
            await registry.withdraw(self._published, self.address, timeout=REGISTRY_TIMEOUT_SECONDS)
            self._published = []
        host, self._host = self._host, None
        if host is not None:
            await host.stop()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> McpBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
