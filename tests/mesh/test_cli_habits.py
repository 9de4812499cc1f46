"""The command's habits, against fake services on a real gRPC server (fast, in-process):
--version, help for every option, --json everywhere with the gateway's field names,
a closed pipe ends quietly, progress on a terminal, colour only where it belongs."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentplex.contract import limits
from agentplex.mesh import cli, render
from agentplex.runtime.settings import Settings
from agentplex.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    mesh_control_service_pb2,
    mesh_control_service_pb2_grpc,
    step_event_pb2,
    task_pb2,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
)

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RESULT = task_pb2.TaskResult(
    status=task_pb2.TASK_STATUS_COMPLETED, output="6*7 = 42.", steps_used=2, tool_calls=1
)
TOOL = tool_pb2.ToolDefinition(
    name="calculator",
    version="1.0.0",
    description="Evaluates arithmetic.",
    input_schema_json='{"type": "object"}',
    output_schema_json='{"type": "object"}',
    side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
)
PART = mesh_control_service_pb2.SupervisedPart(
    name="assistant",
    pid=4242,
    address="127.0.0.1:1",
    state=mesh_control_service_pb2.PART_STATE_RUNNING,
    last_exit_code=0,
)


def events(task_id: str = "t-1") -> list[step_event_pb2.StepEvent]:
    def event(sequence: int, step: int, **kind: Any) -> step_event_pb2.StepEvent:
        return step_event_pb2.StepEvent(
            task_id=task_id, sequence=sequence, agent="assistant", step=step, **kind
        )

    return [
        event(1, 0, task_accepted=step_event_pb2.TaskAccepted(session_id="s-1", max_steps=10)),
        event(2, 1, step_started=step_event_pb2.StepStarted()),
        event(
            3,
            1,
            tool_call=step_event_pb2.ToolCallStarted(
                tool_name="calculator", tool_version="1.0.0", arguments_json='{"expression": "6*7"}'
            ),
        ),
        event(
            4,
            1,
            tool_result=step_event_pb2.ToolCallResult(tool_name="calculator", result_json="42"),
        ),
        event(5, 2, final_result=step_event_pb2.TaskFinished(result=RESULT)),
    ]


def task(task_id: str) -> task_pb2.Task:
    return task_pb2.Task(
        task_id=task_id,
        agent="assistant",
        status=task_pb2.TASK_STATUS_COMPLETED,
        attempts=1,
        last_sequence=5,
        result=RESULT,
    )


class FakeAgent(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def RunTask(self, request, context):
        self.calls.append("RunTask")
        return agent_service_pb2.RunTaskResponse(result=RESULT)

    def StreamSteps(self, request, context):
        self.calls.append("StreamSteps")
        if request.prompt == "endless":  # until the caller hangs up (or 60 s)
            give_up = time.monotonic() + 60
            sequence = 0
            while context.is_active() and time.monotonic() < give_up:
                sequence += 1
                yield agent_service_pb2.StreamStepsResponse(
                    event=step_event_pb2.StepEvent(
                        task_id="t-1", sequence=sequence, step_started=step_event_pb2.StepStarted()
                    )
                )
                time.sleep(0.002)
            return
        for event in events():
            yield agent_service_pb2.StreamStepsResponse(event=event)

    def SubmitTask(self, request, context):
        return agent_service_pb2.SubmitTaskResponse(task=task(request.task.task_id or "t-1"))

    def GetTask(self, request, context):
        return agent_service_pb2.GetTaskResponse(task=task(request.task_id))

    def CancelTask(self, request, context):
        return agent_service_pb2.CancelTaskResponse(task=task(request.task_id))

    def WatchTask(self, request, context):
        for event in events(request.task_id):
            yield agent_service_pb2.WatchTaskResponse(event=event)


class FakeRegistry(tool_registry_service_pb2_grpc.ToolRegistryServiceServicer):
    def ListTools(self, request, context):
        return tool_registry_service_pb2.ListToolsResponse(tools=[TOOL])

    def GetTool(self, request, context):
        return tool_registry_service_pb2.GetToolResponse(tool=TOOL)

    def RegisterTool(self, request, context):
        return tool_registry_service_pb2.RegisterToolResponse(tool=request.tool, created=True)

    def SetToolState(self, request, context):
        retired = tool_pb2.ToolDefinition()
        retired.CopyFrom(TOOL)
        retired.state = request.state
        retired.replacement = request.replacement
        return tool_registry_service_pb2.SetToolStateResponse(tool=retired)


class FakeControl(mesh_control_service_pb2_grpc.MeshControlServiceServicer):
    def ListParts(self, request, context):
        return mesh_control_service_pb2.ListPartsResponse(parts=[PART])

    def RestartPart(self, request, context):
        return mesh_control_service_pb2.RestartPartResponse(parts=[PART])


@pytest.fixture(scope="module")
def fake_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeAgent]]:
    """A state file naming one gRPC server that plays the assistant, registry and control."""
    agent = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
    tool_registry_service_pb2_grpc.add_ToolRegistryServiceServicer_to_server(FakeRegistry(), server)
    mesh_control_service_pb2_grpc.add_MeshControlServiceServicer_to_server(FakeControl(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    address = f"127.0.0.1:{port}"
    state_file = tmp_path_factory.mktemp("fake-mesh") / "mesh.json"
    state_file.write_text(
        json.dumps({"assistant": address, "registry": address, "control": address})
    )
    try:
        yield state_file, agent
    finally:
        server.stop(grace=None)


@pytest.fixture
def plain_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NO_COLOR", "AGENTPLEX_NO_COLOR", "AGENTPLEX_STATE_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(state_file: Path, *args: str) -> int:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--state-file", str(state_file), *args])
    code = exited.value.code
    assert isinstance(code, int)
    return code


# --version and help ----------------------------------------------------------------------


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentplex {metadata.version('agentplex')}"


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


def commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """The parsers that run something (no sub-commands of their own)."""
    return [
        (prog, p)
        for prog, p in all_parsers(parser)
        if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    ]


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{prog} {action.dest}"
        for prog, parser in all_parsers(cli.build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_every_command_takes_json() -> None:
    # `serve` runs one part of the mesh as a long-lived process with its own flags
    # (`agentplex serve memory --help`): it prints logs, not results.
    runnable = [(prog, p) for prog, p in commands(cli.build_parser()) if prog != "agentplex serve"]
    # up ps restart run submit watch status cancel token, tools ×5, mcp serve
    assert len(runnable) == 15
    without = [
        prog
        for prog, parser in runnable
        if not any("--json" in action.option_strings for action in parser._actions)
    ]
    assert without == []


def test_help_states_the_limits_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"1–{limits.MAX_STEPS_LIMIT} (default {limits.DEFAULT_MAX_STEPS})" in text
    assert (
        f"{limits.MIN_TOKEN_BUDGET}–{limits.MAX_TOKEN_BUDGET} "
        f"(default {limits.DEFAULT_TOKEN_BUDGET})"
    ) in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for code, meaning in ((0, "success"), (1, "failed"), (2, "bad usage"), (130, "interrupted")):
        assert re.search(rf"^  {code} +.*{meaning}", top, re.MULTILINE), (code, top)
    assert re.search(rf"^  {cli.EXIT_BROKEN_PIPE} +stdout was closed", top, re.MULTILINE)


# --json: the gateway's field names --------------------------------------------------------


def snake_case_keys(value: object) -> list[str]:
    """Every key in a JSON value that is not a proto field name (lower snake case)."""
    if isinstance(value, dict):
        bad = [k for k in value if not re.fullmatch(r"[a-z][a-z0-9_]*", k)]
        return bad + [k for v in value.values() for k in snake_case_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in snake_case_keys(v)]
    return []


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("run", "--json", "hi"), "tool_calls"),
        (("run", "--json", "--stream", "hi"), "task_id"),
        (("submit", "--json", "hi"), "task_id"),
        (("watch", "--json", "t-1"), "task_id"),
        (("status", "--json", "t-1"), "last_sequence"),
        (("cancel", "--json", "t-1"), "cancel_requested"),
        (("tools", "list", "--json"), "input_schema_json"),
        (("tools", "show", "--json", "calculator"), "output_schema_json"),
        (("tools", "deprecate", "--json", "calculator@1.0.0", "--replacement", "c@2"), "state"),
        (("ps", "--json"), "last_exit_code"),
        (("restart", "--json", "assistant"), "crash_looping"),
    ],
)
def test_json_uses_the_gateways_field_names(
    fake_mesh, plain_env, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], key: str
) -> None:
    state_file, _ = fake_mesh
    assert run_cli(state_file, *args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines
    assert [k for line in lines for k in snake_case_keys(line)] == []
    assert any(key in line for line in lines), lines
    # Default values are printed, as the gateway prints them (always_print_primitive_fields).
    if args[0] in ("status", "cancel"):
        assert lines[0]["cancel_requested"] is False


def test_tools_register_json(fake_mesh, plain_env, capsys, tmp_path: Path) -> None:
    state_file, _ = fake_mesh
    definition = tmp_path / "calc.yaml"
    definition.write_text(
        "name: calc\nversion: 1.0.0\ndescription: d\n"
        "input_schema: {type: object}\noutput_schema: {type: object}\n"
    )
    assert run_cli(state_file, "tools", "register", "--json", str(definition)) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["created"] is True
    assert answer["tool"]["side_effect"] == "SIDE_EFFECT_SIDE_EFFECTING"


def test_up_json_prints_its_progress_as_json_lines(capsys, monkeypatch) -> None:
    cli._say_json("agentplex: starting the mesh")
    assert json.loads(capsys.readouterr().out) == {"message": "agentplex: starting the mesh"}


# A closed pipe ---------------------------------------------------------------------------


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no file descriptor")


def test_a_closed_stdout_ends_quietly_in_process(fake_mesh, plain_env, monkeypatch, capsys) -> None:
    state_file, _ = fake_mesh
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert run_cli(state_file, "run", "--json", "--stream", "hi") == cli.EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_a_reader_that_stops_reading_ends_the_stream_quietly(fake_mesh) -> None:
    """`agentplex run --json --stream … | head -1`, with a stream that never ends by itself."""
    state_file, _ = fake_mesh
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "agentplex.mesh", "--state-file", str(state_file)),
            *("run", "--json", "--stream", "endless"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        assert json.loads(first)["task_id"] == "t-1"
        process.stdout.close()  # what `head -1` does once it has its line
        assert process.wait(timeout=60) == cli.EXIT_BROKEN_PIPE
        assert process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# Progress on a terminal --------------------------------------------------------------------


def test_run_shows_progress_on_a_terminal_and_prints_only_the_answer(
    fake_mesh, plain_env, monkeypatch, capsys
) -> None:
    state_file, agent = fake_mesh
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    agent.calls.clear()
    assert run_cli(state_file, "run", "what is 6*7") == 0
    assert capsys.readouterr().out == "6*7 = 42.\n"
    assert agent.calls == ["StreamSteps"]
    shown = terminal.getvalue()
    assert "assistant: step 1, calling calculator" in ANSI.sub("", shown.replace("\r", "\n"))
    assert shown.endswith("\r\x1b[K")  # the progress line is gone before the answer


def test_run_without_a_terminal_prints_exactly_the_answer(fake_mesh, plain_env, capsys) -> None:
    state_file, agent = fake_mesh
    agent.calls.clear()
    assert run_cli(state_file, "run", "what is 6*7") == 0
    assert capsys.readouterr() == ("6*7 = 42.\n", "")
    assert agent.calls == ["RunTask"]


def test_progress_line_follows_the_steps() -> None:
    out = Terminal()
    now = [100.0]
    progress = render.Progress("assistant", out=out, clock=lambda: now[0])
    assert progress.line() == "assistant: starting… 0s"
    for event in events()[:3]:
        progress.event(event)
    now[0] += 3.4
    assert progress.line() == "assistant: step 1, calling calculator… 3s"
    progress.event(events()[-1])
    assert progress.final_result == RESULT
    progress.clear()
    assert "\x1b[2m" not in out.getvalue()  # no colour unless asked


# Colour ------------------------------------------------------------------------------------


def test_colour_on_a_terminal_only(fake_mesh, plain_env, monkeypatch, capsys) -> None:
    state_file, _ = fake_mesh
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert run_cli(state_file, "run", "--stream", "hi") == 0
    coloured = terminal.getvalue()
    assert "\x1b[2m" in coloured  # the tool call, dim
    monkeypatch.undo()
    plain_env.delenv("NO_COLOR", raising=False)
    assert run_cli(state_file, "run", "--stream", "hi") == 0
    piped = capsys.readouterr().out
    assert not ANSI.search(piped)
    assert piped == ANSI.sub("", coloured)  # the same text, without colour


@pytest.mark.parametrize("variable", ["NO_COLOR", "AGENTPLEX_NO_COLOR"])
def test_no_color_turns_colour_off_even_on_a_terminal(
    fake_mesh, plain_env, monkeypatch, variable: str
) -> None:
    state_file, _ = fake_mesh
    plain_env.setenv(variable, "1")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert run_cli(state_file, "run", "--stream", "hi") == 0
    assert "tool call  calculator@1.0.0" in terminal.getvalue()
    assert not ANSI.search(terminal.getvalue())


def test_errors_are_red_on_a_terminal_only(plain_env, monkeypatch, tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_cli(missing, "status", "t-1") == 1
    assert terminal.getvalue().startswith("\x1b[31magentplex: no mesh is running here")
    plain_env.setenv("NO_COLOR", "yes")
    terminal.seek(0)
    terminal.truncate()
    assert run_cli(missing, "status", "t-1") == 1
    assert terminal.getvalue().startswith("agentplex: no mesh is running here")


def test_no_color_follows_the_standards_rule(plain_env) -> None:
    """https://no-color.org: present and not empty, whatever the value."""
    assert Settings().no_color is False
    for value, expected in (("1", True), ("0", True), ("false", True), ("", False)):
        plain_env.setenv("NO_COLOR", value)
        assert Settings().no_color is expected, value


# Secure by default -----------------------------------------------------------------------


def test_up_turns_auth_and_mtls_on_unless_told_otherwise() -> None:
    parse = cli.build_parser().parse_args
    assert (parse(["up"]).auth, parse(["up"]).mtls) == (True, True)
    off = parse(["up", "--no-auth", "--no-mtls"])
    assert (off.auth, off.mtls) == (False, False)
    assert (parse(["up", "--auth", "--mtls"]).auth, parse(["up", "--mtls"]).mtls) == (True, True)


def test_no_auth_beyond_loopback_is_refused_before_anything_starts(
    plain_env, capsys, tmp_path: Path
) -> None:
    plain_env.setenv("AGENTPLEX_GATEWAY_LISTEN_HOST", "0.0.0.0")
    state_file = tmp_path / ".agentplex" / "mesh.json"
    assert run_cli(state_file, "up", "--no-auth") == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("agentplex: --no-auth is for loopback only") and "0.0.0.0" in err
    assert len(err.splitlines()) == 1
    assert not state_file.parent.exists()


def test_token_grants_the_default_scopes_and_admin_on_request(
    plain_env, capsys, tmp_path: Path
) -> None:
    from agentplex.contract import scopes
    from agentplex.mesh import dev_auth

    issuer = dev_auth.ensure_issuer(tmp_path / "auth")
    state_file = tmp_path / "mesh.json"
    state_file.write_text(json.dumps({"auth": issuer.state()}))
    assert run_cli(state_file, "token", "--tenant", "acme", "--json") == 0
    minted = json.loads(capsys.readouterr().out)
    assert minted["scopes"] == list(scopes.DEFAULT_SCOPES)
    assert run_cli(state_file, "token", "--tenant", "acme", "--admin", "--json") == 0
    admin = json.loads(capsys.readouterr().out)
    assert admin["scopes"] == [*scopes.DEFAULT_SCOPES, *scopes.ADMIN_SCOPES]
    assert {"tools:admin", "memory:admin", "mesh:admin"} <= set(admin["scopes"])
    assert admin["tenant"] == "acme" and admin["subject"] == "dev"


def test_token_on_a_mesh_without_auth_says_so(plain_env, capsys, tmp_path: Path) -> None:
    state_file = tmp_path / "mesh.json"
    state_file.write_text(json.dumps({"assistant": "127.0.0.1:1"}))
    assert run_cli(state_file, "token", "--tenant", "acme") == cli.EXIT_USAGE
    assert "checks no tokens" in capsys.readouterr().err
