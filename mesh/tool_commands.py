"""`agentplex tools …`: publish, inspect and retire tool contracts.

A definition file (JSON or YAML) looks like:

    name: weather.lookup
    version: 1.0.0
    description: Looks up the current weather for a city.
    side_effect: read_only          # read_only | idempotent | side_effecting
    endpoint: 127.0.0.1:7001        # the ToolExecutorService that runs it
    input_schema: {type: object, properties: {city: {type: string}}, required: [city]}
    output_schema: {type: object, properties: {celsius: {type: number}}}
"""

from __future__ import annotations

import argparse
import json
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
    from agentplex.runtime.tls import MeshTls

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
