"""The newcomer's path, for real: `agentplex up` as a process, with its defaults (tokens
at the gateway, mTLS inside), then `agentplex run`, `agentplex tools list` (no token:
the CLI is the operator) and grpcurl and curl against the addresses in the state file,
the README's gateway commands among them."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def agentplex(
    *args: str, state_file: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a newcomer would: from the mesh's directory, default state file."""
    if state_file.parent.name == ".agentplex":
        cwd, flags = state_file.parent.parent, []
    else:
        cwd, flags = state_file.parent, ["--state-file", str(state_file)]
    return subprocess.run(
        [sys.executable, "-m", "agentplex.mesh", *flags, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def running_mesh(mesh_up) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    # The defaults: the gateway checks tokens and the parts talk mTLS. The CLI calls the
    # agents directly with the mesh's cli certificate; callers of the gateway present a
    # token from `agentplex token`.
    with mesh_up() as mesh:
        yield mesh


def grpcurl_binary() -> str:
    return shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def cli_tls_flags(state: dict[str, object]) -> list[str]:
    """grpcurl's flags for the mesh's `cli` certificate, as the README shows them."""
    pki = Path(str(state["pki"]))
    return [
        *("-cacert", str(pki / "ca.pem")),
        *("-cert", str(pki / "cli.pem")),
        *("-key", str(pki / "cli-key.pem")),
    ]


def test_state_file_names_every_part(running_mesh) -> None:
    state_file, _ = running_mesh
    state = json.loads(state_file.read_text())
    parts = ("redis", "memory", "registry", "tools", "assistant", "researcher", "supervisor")
    for part in (*parts, "gateway", "gateway-xds", "console", "envoy_admin"):
        assert part in state, part
    assert state["console"] == f"http://{state['gateway']}/console/"
    assert state["metrics"]["gateway"].endswith("/stats/prometheus")
    assert set(state["workers"]) == {
        "assistant-worker-1",
        "researcher-worker-1",
        "supervisor-worker-1",
    }
    assert state["redis"].startswith("redis://127.0.0.1:")
    assert state["assistant"].startswith("127.0.0.1:")


def test_run_stream_shows_the_calculator_call_and_391(running_mesh) -> None:
    state_file, _ = running_mesh
    done = agentplex(
        "run", "--stream", "--agent", "assistant", "what is 17*23?", state_file=state_file
    )
    assert done.returncode == 0, done.stderr
    assert "tool call  calculator@1.0.0" in done.stdout
    assert "answer: 17*23 = 391." in done.stdout


def test_run_without_stream_prints_the_answer(running_mesh) -> None:
    state_file, _ = running_mesh
    done = agentplex("run", "what is 6*7", state_file=state_file)
    assert (done.returncode, done.stdout.strip()) == (0, "6*7 = 42.")


def test_json_is_the_gateways_and_a_closed_pipe_ends_quietly(running_mesh) -> None:
    """`agentplex run --json --stream … | head -3`: three events, proto field names, and
    no traceback once head has stopped reading."""
    state_file, _ = running_mesh
    command = shlex.join(
        [
            *(sys.executable, "-m", "agentplex.mesh", "--state-file", str(state_file)),
            *("run", "--json", "--stream", "what is 17*23?"),
        ]
    )
    piped = subprocess.run(
        f"{command} | head -3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stderr == ""
    events = [json.loads(line) for line in piped.stdout.splitlines()]
    assert len(events) == 3
    assert events[0]["task_id"] and "taskId" not in events[0]
    assert events[0]["task_accepted"]["max_steps"] == 10
    listed = agentplex("tools", "list", "--json", state_file=state_file)
    tools = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"input_schema_json", "side_effect"} <= set(tools[0])
    parts = agentplex("ps", "--json", state_file=state_file)
    assert all("log_path" in json.loads(line) for line in parts.stdout.splitlines())


def test_researcher_answers_from_the_docs(running_mesh) -> None:
    state_file, _ = running_mesh
    done = agentplex(
        "run", "--agent", "researcher", "how do I run the tests?", state_file=state_file
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("From "), done.stdout  # a section of README or docs/


def test_supervisor_streams_a_live_tree_of_two_sub_agents(running_mesh) -> None:
    state_file, _ = running_mesh
    done = agentplex(
        "run",
        "--stream",
        "--agent",
        "supervisor",
        "what is 17*23 and how does the tool registry validate arguments?",
        state_file=state_file,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    started = [first("delegated to assistant: task d-"), first("delegated to researcher: task d-")]
    ended = [first("] assistant completed"), first("] researcher completed")]
    assert max(started) < min(ended)  # both sub-agents at work at once
    # Their own steps, nested under the supervisor's, as they happened.
    assert any("  assistant | tool call  calculator@" in line for line in lines)
    assert any("  researcher | tool call  docs.search@" in line for line in lines)
    answers = [line for line in lines if line.startswith("answer: ")]
    assert len(answers) == 1
    assert "assistant: 17*23 = 391." in answers[0] and "researcher: From " in answers[0]


def test_tools_list(running_mesh) -> None:
    state_file, _ = running_mesh
    done = agentplex("tools", "list", state_file=state_file)
    assert done.returncode == 0, done.stderr
    for name in ("calculator", "docs.search", "notes.read", "notes.write"):
        assert name in done.stdout


def test_errors_are_one_readable_line(running_mesh, tmp_path: Path) -> None:
    state_file, _ = running_mesh
    unknown = agentplex("run", "--agent", "nope", "hi", state_file=state_file)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "agentplex: unknown agent 'nope'; this mesh runs: assistant, researcher, supervisor"
    )
    bad = agentplex("run", "--max-steps", "26", "hi", state_file=state_file)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "agentplex: INVALID_ARGUMENT: max_steps: must be between 1 and 25 (got 26)"
    )
    nothing = agentplex("run", "hi", state_file=tmp_path / "none.json")
    assert nothing.returncode == 1
    assert "start one with `agentplex up`" in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1


def test_grpcurl_lists_services_health_and_reflection(running_mesh) -> None:
    """Service by service, over mTLS with the cli certificate (README)."""
    state_file, _ = running_mesh
    grpcurl = grpcurl_binary()
    state = json.loads(state_file.read_text())
    listed = subprocess.run(
        [grpcurl, *cli_tls_flags(state), state["assistant"], "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"agentplex.v1.AgentService", "grpc.health.v1.Health"} <= services
    assert any(s.startswith("grpc.reflection.") for s in services)
    health = subprocess.run(
        [grpcurl, *cli_tls_flags(state), state["registry"], "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"status": "SERVING"' in health.stdout
    plaintext = subprocess.run(
        [grpcurl, "-plaintext", state["registry"], "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert plaintext.returncode != 0  # mTLS by default: no plaintext callers


def test_the_gateway_runs_a_task_for_grpcurl_and_curl(running_mesh) -> None:
    """The issue's newcomer path: one gateway address, gRPC (grpcurl) and JSON (HTTP), with
    a token from `agentplex token`; without one, UNAUTHENTICATED and 401."""
    import httpx

    state_file, _ = running_mesh
    state = json.loads(state_file.read_text())
    minted = agentplex("token", "--tenant", "acme", "--json", state_file=state_file)
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)["token"]
    bearer = f"authorization: Bearer {token}"
    grpcurl = grpcurl_binary()

    def stream(*headers: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                grpcurl,
                "-plaintext",
                *(arg for header in headers for arg in ("-H", header)),
                "-d",
                '{"prompt": "what is 17*23?"}',
                state["gateway"],
                "agentplex.v1.AgentService/StreamSteps",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    streamed = stream(bearer)
    assert streamed.returncode == 0, streamed.stderr
    assert '"toolName": "calculator"' in streamed.stdout
    assert "391" in streamed.stdout
    refused = stream()
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr
    assert "Jwt is missing" in refused.stderr
    url = f"http://{state['gateway']}/v1/agents/assistant/tasks:run"
    response = httpx.post(
        url,
        json={"prompt": "what is 17*23?"},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["result"]["status"] == "TASK_STATUS_COMPLETED"
    assert "391" in response.json()["result"]["output"]
    anonymous = httpx.post(url, json={"prompt": "what is 17*23?"}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == 16
    # The console's page stays open (it asks for a token before calling).
    console = httpx.get(state["console"], timeout=10)
    assert console.status_code == 200 and "agentplex console" in console.text


def test_a_token_carries_the_tenant_subject_and_scopes_asked_for(running_mesh) -> None:
    import jwt

    state_file, _ = running_mesh
    state = json.loads(state_file.read_text())
    minted = agentplex(
        "token",
        "--tenant",
        "acme",
        "--subject",
        "ana",
        "--scope",
        "tasks:run",
        "--ttl",
        "60",
        state_file=state_file,
    )
    assert minted.returncode == 0, minted.stderr
    jwks = json.loads((Path(state["auth"]["key"]).parent / "jwks.json").read_text())
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(
        minted.stdout.strip(), key.key, algorithms=[key.algorithm_name], audience="agentplex"
    )
    assert (claims["tenant"], claims["sub"], claims["scope"]) == ("acme", "ana", "tasks:run")
    assert claims["iss"] == "agentplex-dev" and claims["exp"] - claims["iat"] == 60
    assert oct(Path(state["auth"]["key"]).stat().st_mode & 0o777) == "0o600"
    for ttl in ("0", "nan", "inf"):
        bad = agentplex("token", "--tenant", "acme", "--ttl", ttl, state_file=state_file)
        assert bad.returncode == 2 and "--ttl must be a positive number" in bad.stderr, ttl


def test_submit_watch_status_cancel(running_mesh) -> None:
    state_file, _ = running_mesh
    submitted = agentplex("submit", "--task-id", "cli-1", "what is 9*9", state_file=state_file)
    assert (submitted.returncode, submitted.stdout.strip()) == (0, "cli-1")
    watched = agentplex("watch", "cli-1", state_file=state_file)
    assert watched.returncode == 0, watched.stderr
    assert "tool call  calculator@1.0.0" in watched.stdout
    assert watched.stdout.rstrip().endswith("answer: 9*9 = 81.")
    resumed = agentplex("watch", "cli-1", "--after", "5", state_file=state_file)
    assert resumed.stdout.splitlines()[0].startswith("[  6]")
    outcome = agentplex("watch", "cli-1", "--result", state_file=state_file)
    assert outcome.returncode == 0, outcome.stderr
    assert "calculator@1.0.0" not in outcome.stdout  # no steps: the outcome alone
    assert "completed: 2 steps" in outcome.stdout.splitlines()[0]
    assert outcome.stdout.rstrip().endswith("answer: 9*9 = 81.")
    status = agentplex("status", "cli-1", state_file=state_file)
    assert "task cli-1 on assistant: completed, attempts 1" in status.stdout
    cancelled = agentplex("cancel", "cli-1", state_file=state_file)
    assert "completed" in cancelled.stdout  # cancelling a finished task changes nothing
    missing = agentplex("status", "nope", state_file=state_file)
    assert missing.returncode == 1
    assert missing.stderr.startswith("agentplex: NOT_FOUND: task 'nope'")


def test_a_callers_trace_reaches_the_worker_log_with_no_exporter(running_mesh) -> None:
    """The mesh as `up` runs it records no spans; the caller's trace id still crosses
    the gRPC hop (header only) and the queue, into the worker's log line."""
    import grpc

    from agentplex.contract import callers
    from agentplex.runtime.tls import TlsFiles
    from agentplex.v1 import agent_service_pb2 as pb
    from agentplex.v1 import agent_service_pb2_grpc, task_pb2

    state_file, _ = running_mesh
    state = json.loads(state_file.read_text())
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    cli_tls = TlsFiles.for_identity(Path(state["pki"]), callers.CLI).read()
    with grpc.secure_channel(
        state["assistant"],
        cli_tls.channel_credentials(),
        options=[("grpc.ssl_target_name_override", callers.AGENT)],
    ) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        spec = task_pb2.TaskSpec(prompt="what is 2*3", task_id="traced-1")
        stub.SubmitTask(
            pb.SubmitTaskRequest(task=spec),
            metadata=(("traceparent", f"00-{trace_id}-b7ad6b7169203331-01"),),
            timeout=10,
        )
        request = pb.WatchTaskRequest(task_id="traced-1", final_only=True)
        (final,) = list(stub.WatchTask(request, timeout=30))
    assert final.event.final_result.result.output == "2*3 = 6."
    logs = state_file.parent / "logs"

    def finished_line() -> dict[str, object] | None:
        for log in logs.glob("*.log"):
            for line in log.read_text().splitlines():
                if '"traced-1"' in line and "task finished" in line:
                    return json.loads(line)
        return None

    wait_for(lambda: finished_line() is not None, 10, "the worker never logged the task")
    finished = finished_line()
    assert finished is not None
    assert finished["trace_id"] == trace_id


CALCULATOR_YAML = """\
name: calculator
version: {version}
description: Evaluates an arithmetic expression exactly.
side_effect: read_only
endpoint: {endpoint}
input_schema:
  type: object
  properties:
    expression: {{type: string, minLength: 1, maxLength: 500}}
    precision: {{type: integer, minimum: 0, maximum: 12}}
  required: [{required}]
  additionalProperties: false
output_schema:
  type: object
  properties:
    expression: {{type: string}}
    result: {{type: number}}
  required: [expression, result]
"""


def test_tools_worked_example(running_mesh, tmp_path: Path) -> None:
    """docs/TOOLS.md, step by step."""
    state_file, _ = running_mesh
    endpoint = json.loads(state_file.read_text())["tools"]

    def publish(version: str, required: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"calculator-{version}.yaml"
        path.write_text(
            CALCULATOR_YAML.format(version=version, endpoint=endpoint, required=required)
        )
        return agentplex("tools", "register", str(path), state_file=state_file)

    minor = publish("1.1.0", "expression")
    assert (minor.returncode, minor.stdout.strip()) == (0, "calculator 1.1.0: published")
    breaking = publish("1.2.0", "expression, precision")
    assert breaking.returncode == 1
    assert "FAILED_PRECONDITION: calculator 1.2.0 would break callers of 1.1.0" in breaking.stderr
    assert "$.precision: property became required" in breaking.stderr
    major = publish("2.0.0", "expression, precision")
    assert major.returncode == 0, major.stderr
    shown = agentplex("tools", "show", "calculator", state_file=state_file)
    assert "version: 2.0.0" in shown.stdout
    pinned = agentplex("tools", "list", "--agent", "assistant", state_file=state_file)
    assert "calculator   1.1.0" in pinned.stdout
    answer = agentplex("run", "--stream", "what is 17*23?", state_file=state_file)
    assert "tool call  calculator@1.1.0" in answer.stdout
    assert "answer: 17*23 = 391." in answer.stdout
    deprecated = agentplex(
        "tools",
        "deprecate",
        "calculator@1.1.0",
        "--replacement",
        "calculator@2",
        state_file=state_file,
    )
    assert deprecated.stdout.strip() == "calculator 1.1.0: deprecated; use calculator@2"
    assert (
        "state: deprecated"
        in agentplex("tools", "show", "calculator@1", state_file=state_file).stdout
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    refused = agentplex("tools", "register", str(bad), state_file=state_file)
    assert refused.returncode == 2 and "missing version" in refused.stderr


BEARER = '-H "authorization: Bearer $TOKEN"'


def readme_gateway_commands() -> list[str]:
    """The README's gateway block ("Through the gateway"), one command per line:
    continuation lines joined, comment lines dropped."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Through the gateway", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = (line.strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_readmes_gateway_commands_work_with_a_token(running_mesh) -> None:
    """Every grpcurl and curl line of the README's gateway section, as written (the
    gateway's address aside), with the token its first line mints; without the token,
    UNAUTHENTICATED (gRPC) and 401 (JSON). The CLI itself needed none (the tests above)."""
    state_file, _ = running_mesh
    state = json.loads(state_file.read_text())
    first, *commands = readme_gateway_commands()
    assert first.startswith("TOKEN=$(agentplex token --tenant acme)"), first
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(command: str, **extra: str) -> subprocess.CompletedProcess[str]:
        """One README line in bash, from the mesh's directory, against this gateway."""
        return subprocess.run(
            ["bash", "-c", command.replace("localhost:8080", state["gateway"])],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=state_file.parent.parent,
            env={**env, **extra},
        )

    minted = sh(f'{first}\nprintf %s "$TOKEN"')
    assert minted.returncode == 0 and minted.stdout.count(".") == 2, minted.stderr
    token = minted.stdout
    # Each line calls the gateway with the token, but health and readiness (no token).
    for command in commands:
        assert BEARER in command or "/health" in command or "tasks:run" in command, command

    outputs: dict[str, str] = {}
    task_id = ""
    for command in commands:
        if "TASK_ID" in command:
            assert task_id, "the README submits a task before it names TASK_ID"
            command = command.replace("TASK_ID", task_id)
        done = sh(command, TOKEN=token)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs[command] = done.stdout
        if "2**10" in command:
            task_id = json.loads(done.stdout)["task"]["task_id"]

    def output(*parts: str) -> str:
        (found,) = [out for command, out in outputs.items() if all(p in command for p in parts)]
        return found

    assert "agentplex.v1.AgentService" in output("grpcurl", " list")
    assert '"toolName": "calculator"' in output("grpcurl", "StreamSteps")
    assert output("grpcurl", "RunTask").count("From ") >= 1  # the researcher, from the docs
    assert '"name": "calculator"' in output("grpcurl", "ListTools")
    assert "assistant" in json.loads(output("localhost:8080/v1/agents "))["default_agent"]
    assert "391" in json.loads(output("tasks:run", "17*23", "Bearer"))["result"]["output"]
    streamed = [json.loads(line)["event"] for line in output("tasks:stream").splitlines()]
    finals = [event["final_result"]["result"] for event in streamed if "final_result" in event]
    assert len(finals) == 1 and "391" in finals[0]["output"]
    assert json.loads(output("tasks/" + task_id + " "))["task"]["task_id"] == task_id
    events = output(f"tasks/{task_id}/events")
    assert '"final_result"' in events and "1024" in events, events
    assert json.loads(output(f"{task_id}:cancel"))["task"]["task_id"] == task_id
    card = json.loads(output("/card"))
    assert "code" not in card and '"assistant"' in json.dumps(card), card
    assert "calculator" in output("/v1/tools")
    assert json.loads(output("promt"))["code"] == 3

    # The same calls without the token: refused at the door.
    unauthenticated = json.loads(output("tasks:run", "17*23", "curl -s -X POST"))
    assert unauthenticated["code"] == 16 and "Jwt is missing" in unauthenticated["message"]
    for command in commands:
        if BEARER not in command:
            continue
        bare = command.replace(BEARER + " ", "")
        if "TASK_ID" in bare:
            bare = bare.replace("TASK_ID", task_id)
        if bare.startswith("grpcurl"):
            refused = sh(bare)
            assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, bare
        else:
            code = sh(bare.replace("curl -s", "curl -o /dev/null -w %{http_code} -s", 1))
            assert code.stdout == "401", f"{bare}: {code.stdout}"


def test_the_cli_needs_no_token(running_mesh, tmp_path: Path) -> None:
    """The default mesh checks tokens at the gateway; `agentplex run` needs none, even
    from a directory with no development issuer of its own."""
    state_file, _ = running_mesh
    done = subprocess.run(
        [
            *(sys.executable, "-m", "agentplex.mesh", "--state-file", str(state_file)),
            *("run", "what is 6*7"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("AGENTPLEX_")},
    )
    assert (done.returncode, done.stdout.strip()) == (0, "6*7 = 42."), done.stderr


def test_second_up_in_the_same_place_is_refused(running_mesh) -> None:
    state_file, _ = running_mesh
    second = agentplex("up", "--ephemeral-ports", state_file=state_file, timeout=60)
    assert second.returncode == 1
    assert "a mesh is already running here" in second.stdout


def test_sigterm_stops_everything_cleanly(running_mesh) -> None:
    """Runs last in this module: stops the mesh and checks nothing is left behind."""
    state_file, process = running_mesh
    state = json.loads(state_file.read_text())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    output = process.stdout.read()
    assert "agentplex: stopped" in output
    assert not state_file.exists()
    import socket

    addresses = [
        state[part]
        for part in (
            "memory",
            "registry",
            "tools",
            "assistant",
            "researcher",
            "supervisor",
            "gateway-xds",
            "gateway",
        )
    ]
    for address in [*addresses, *state["workers"].values()]:
        host, port = address.rsplit(":", 1)
        with socket.socket() as sock:
            assert sock.connect_ex((host, int(port))) != 0, f"{address} still listening"
