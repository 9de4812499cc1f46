"""`agentplex tools …`: publish, inspect and retire tool contracts.

A definition file (JSON or YAML) looks like:

    name: weather.lookup
    version: 1.0.0
    description: Looks up the current weather for a city.
    side_effect: read_only          # read_only | idempotent | side_effecting
    endpoint: 127.0.0.1:7001        # the ToolExecutorService that runs it
    input_schema: {type: object, properties: {city: {type: string}}, required: [city]}
    output_schema: {type: object, properties: {celsius: {type: number}}}

`agentplex tools import-mcp NAME --command "CMD ARGS" | --url URL` publishes an MCP
server's tools instead, as NAME.<tool>, and runs their backend in the foreground
(agentplex.interop.mcp_tools).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml

from agentplex.contract import callers
from agentplex.mesh import render
from agentplex.runtime.clients import open_channel
from agentplex.v1 import tool_pb2
from agentplex.v1 import tool_registry_service_pb2 as pb
from agentplex.v1 import tool_registry_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # imported when used (mesh/state.py): cryptography is slow to load
    from agentplex.runtime.tls import MeshTls, TlsFiles

Fail = Callable[[str], Exception]


def add_parsers(tools: argparse.ArgumentParser) -> None:
    commands = tools.add_subparsers(dest="tools_command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="list registered tools")
    listing.add_argument(
        "--agent", default="", help="only the tools this agent may use (default: every tool)"
    )
    listing.add_argument(
        "--all-versions", action="store_true", help="every version, deprecated and retired too"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON object per tool")
    register = commands.add_parser("register", help="publish a tool contract from a file")
    register.add_argument("file", type=Path, help="JSON or YAML definition")
    register.add_argument(
        "--json", action="store_true", help="print the registry's answer (tool, created) as JSON"
    )
    show = commands.add_parser("show", help="show one tool's contract")
    show.add_argument(
        "tool",
        metavar="NAME[@VERSION]",
        help="e.g. calculator (the newest), calculator@1 (newest 1.x), calculator@1.0.0",
    )
    show.add_argument("--json", action="store_true", help="print the contract as JSON")
    deprecate = commands.add_parser("deprecate", help="deprecate (or retire) a version")
    deprecate.add_argument("tool", metavar="NAME@VERSION", help="exact version, e.g. calc@1.0.0")
    deprecate.add_argument(
        "--replacement", required=True, help="what to use instead, e.g. calc@2 (required)"
    )
    deprecate.add_argument(
        "--retire", action="store_true", help="retire: unlisted, and invoking it is NOT_FOUND"
    )
    deprecate.add_argument("--json", action="store_true", help="print the tool as JSON")
    mcp = commands.add_parser(
        "import-mcp",
        help="publish an MCP server's tools and serve them (foreground; run it with &)",
        description="Connect to an MCP server, publish each of its tools as NAME.<tool> at "
        "--version, and run their backend until stopped (Ctrl-C or SIGTERM withdraws it).",
    )
    mcp.add_argument("name", metavar="NAME", help="prefix of the tools' names, e.g. github")
    server = mcp.add_mutually_exclusive_group(required=True)
    server.add_argument(
        "--command",
        dest="mcp_command",
        metavar='"CMD ARGS"',
        help="run the MCP server as this command, speaking stdio (split like a shell)",
    )
    server.add_argument(
        "--url", dest="mcp_url", metavar="URL", help="the MCP server's streamable-HTTP endpoint"
    )
    mcp.add_argument(
        "--version",
        dest="mcp_version",
        default="1.0.0",
        metavar="X.Y.Z",
        help="the version every tool is published at (default 1.0.0); a changed server "
        "needs a new one",
    )
    mcp.add_argument(
        "--port", type=int, default=0, help="port the registry calls the tools on (default: any)"
    )
    mcp.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per published tool (name, version, endpoint)",
    )


def load_definition(path: Path) -> tool_pb2.ToolDefinition:
    """A ToolDefinition from a JSON or YAML file; ValueError says what is wrong."""
    try:
        data: Any = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with name, version, schemas, …")
    missing = [
        k
        for k in ("name", "version", "description", "input_schema", "output_schema")
        if data.get(k) in (None, "")
    ]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    # By its name: the message takes an enum's name as well as its number.
    side_effect = "SIDE_EFFECT_" + str(data.get("side_effect", "side_effecting")).upper()
    if side_effect not in tool_pb2.SideEffect.keys():
        raise ValueError(
            f"{path}: side_effect must be read_only, idempotent or "
            f"side_effecting, not {data.get('side_effect')!r}"
        )
    try:
        input_schema, output_schema = (
            json.dumps(data["input_schema"]),
            json.dumps(data["output_schema"]),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: schemas must be plain JSON values ({exc})") from None
    return tool_pb2.ToolDefinition(
        name=str(data["name"]),
        version=str(data["version"]),
        description=str(data["description"]),
        input_schema_json=input_schema,
        output_schema_json=output_schema,
        side_effect=side_effect,
        endpoint=str(data.get("endpoint") or ""),
    )


async def run(
    args: argparse.Namespace,
    address: str,
    on_rpc_error: Callable[[grpc.aio.AioRpcError], Exception],
    fail: Fail,
    *,
    tls: MeshTls | None = None,
) -> int:
    """`tls`: the `cli` credentials of a mesh with mTLS (the default), or None."""
    if args.tools_command == "import-mcp":
        return await _import_mcp(args, address, tls, fail)
    async with open_channel(address, tls=tls, server_identity=callers.REGISTRY) as channel:
        stub = pb_grpc.ToolRegistryServiceStub(channel)
        handler: Callable[[], Awaitable[int]] = {
            "list": lambda: _list(stub, args),
            "register": lambda: _register(stub, args, fail),
            "show": lambda: _show(stub, args),
            "deprecate": lambda: _deprecate(stub, args, fail),
        }[args.tools_command]
        try:
            return await handler()
        except grpc.aio.AioRpcError as err:
            raise on_rpc_error(err) from None


async def _list(stub: pb_grpc.ToolRegistryServiceStub, args: argparse.Namespace) -> int:
    response = await stub.ListTools(
        pb.ListToolsRequest(agent=args.agent, all_versions=args.all_versions), timeout=10
    )
    render.print_tools(response.tools, json_lines=args.json)
    return 0


async def _register(
    stub: pb_grpc.ToolRegistryServiceStub, args: argparse.Namespace, fail: Fail
) -> int:
    try:
        tool = load_definition(args.file)
    except ValueError as exc:
        raise fail(str(exc)) from None
    response = await stub.RegisterTool(pb.RegisterToolRequest(tool=tool), timeout=10)
    if args.json:
        render.print_json(response)
        return 0
    what = "published" if response.created else "already published (unchanged)"
    print(f"{tool.name} {tool.version}: {what}")
    return 0


async def _show(stub: pb_grpc.ToolRegistryServiceStub, args: argparse.Namespace) -> int:
    name, _, version = args.tool.partition("@")
    tool = (await stub.GetTool(pb.GetToolRequest(name=name, version=version), timeout=10)).tool
    if args.json:
        render.print_json(tool)
        return 0
    print(
        yaml.safe_dump(
            {
                "name": tool.name,
                "version": tool.version,
                "description": tool.description,
                "side_effect": tool_pb2.SideEffect.Name(tool.side_effect)
                .removeprefix("SIDE_EFFECT_")
                .lower(),
                "state": tool_pb2.ToolState.Name(tool.state).removeprefix("TOOL_STATE_").lower(),
                **({"replacement": tool.replacement} if tool.replacement else {}),
                "endpoint": tool.endpoint,
                "input_schema": json.loads(tool.input_schema_json),
                "output_schema": json.loads(tool.output_schema_json),
            },
            sort_keys=False,
        ).rstrip()
    )
    return 0


async def _deprecate(
    stub: pb_grpc.ToolRegistryServiceStub, args: argparse.Namespace, fail: Fail
) -> int:
    name, _, version = args.tool.partition("@")
    if not version:
        raise fail("give the exact version to deprecate, e.g. calculator@1.0.0")
    state = tool_pb2.TOOL_STATE_RETIRED if args.retire else tool_pb2.TOOL_STATE_DEPRECATED
    tool = (
        await stub.SetToolState(
            pb.SetToolStateRequest(
                name=name, version=version, state=state, replacement=args.replacement
            ),
            timeout=10,
        )
    ).tool
    if args.json:
        render.print_json(tool)
        return 0
    label = tool_pb2.ToolState.Name(tool.state).removeprefix("TOOL_STATE_").lower()
    print(f"{tool.name} {tool.version}: {label}; use {tool.replacement}")
    return 0


async def _import_mcp(
    args: argparse.Namespace, address: str, tls: MeshTls | None, fail: Fail
) -> int:
    """Run the MCP bridge until a stop signal: it serves the registry's calls, so it
    lives as long as the tools stay published (like a tool backend of your own)."""
    import asyncio

    from agentplex.interop.mcp_tools import ImportRefused, McpBridge, McpServer
    from agentplex.mesh.cli import EXIT_FAILED, CliError  # the command's own failure
    from agentplex.runtime.process import stop_on_signals

    try:
        server = McpServer.http(args.mcp_url) if args.mcp_url else McpServer.stdio(args.mcp_command)
    except ImportRefused as exc:
        raise fail(str(exc)) from None
    if not 0 <= args.port <= 65535:
        raise fail(f"--port must be 0-65535, not {args.port}")
    bridge = McpBridge(
        name=args.name,
        server=server,
        registry_address=address,
        version=args.mcp_version,
        port=args.port,
        registry_tls=tls,
        serve_tls=_tools_tls_files(args) if tls is not None else None,
    )
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        await bridge.start()
        for tool in bridge.definitions:
            if args.json:
                published = {"name": tool.name, "version": tool.version, "endpoint": bridge.address}
                print(json.dumps(published))
            else:
                print(f"{tool.name} {tool.version}: published, served at {bridge.address}")
        if not args.json:
            print(f"serving the MCP server {server}; Ctrl-C withdraws the tools")
        sys.stdout.flush()  # whoever reads it (a script, `&` in a terminal) sees it now
        await stop.wait()
    except ImportRefused as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    finally:
        await bridge.stop()
    return 0


def _tools_tls_files(args: argparse.Namespace) -> TlsFiles:
    """The mesh's `tools` certificate: the registry calls only backends presenting it."""
    from agentplex.mesh.state import read_state, state_file_path
    from agentplex.runtime.tls import TlsFiles

    pki = read_state(state_file_path(args.state_file)).get("pki")
    assert isinstance(pki, str)  # the caller's `cli` credentials came from it
    return TlsFiles.for_identity(Path(pki), callers.TOOLS)
