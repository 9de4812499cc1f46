"""The Tool Registry over real gRPC: real Redis, real servers on free ports."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2

from agentplex.contract.tool_definition import define
from agentplex.registry import app as registry_app
from agentplex.runtime import errors
from agentplex.runtime.errors import from_rpc_error
from agentplex.runtime.redis_client import as_text
from agentplex.tools.calculator import Calculator
from agentplex.v1 import tool_pb2, tool_registry_service_pb2_grpc
from agentplex.v1 import tool_registry_service_pb2 as pb

BUILTINS = ["calculator", "docs.search", "http.fetch", "notes.read", "notes.write"]
# Every running agent is published as a tool too.
AGENT_TOOLS = ["agent.assistant", "agent.researcher", "agent.supervisor"]
EVERYTHING = sorted([*BUILTINS, *AGENT_TOOLS])


def contract_of(tool: tool_pb2.ToolDefinition) -> tool_pb2.ToolDefinition:
    """The published contract without deployment and lifecycle fields."""
    core = tool_pb2.ToolDefinition()
    core.CopyFrom(tool)
    core.ClearField("endpoint")
    core.ClearField("backend_kind")
    core.ClearField("state")
    core.ClearField("replacement")
    core.ClearField("endpoints")
    return core


TIMEOUT = 10


@pytest.fixture
def registry(mesh, channel_to):
    return tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(mesh.registry))


def invoke_request(
    tool_name: str,
    arguments: Any = None,
    *,
    agent: str = "",
    session: str = "",
    key: str = "",
    raw: str | None = None,
) -> pb.InvokeToolRequest:
    return pb.InvokeToolRequest(
        tool_name=tool_name,
        arguments_json=raw if raw is not None else json.dumps(arguments or {}),
        idempotency_key=key,
        caller=pb.Caller(agent=agent, session_id=session, task_id="task-1"),
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def reason_of(err: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason from the call's rich-status trailer."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == err.code().value[0]
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == errors.ERROR_DOMAIN
                    return info.reason
    return None


def weather(version: str = "1.0.0", **overrides: Any) -> tool_pb2.ToolDefinition:
    definition = define(
        name="weather.lookup",
        version=version,
        description="Looks up the current weather for a city.",
        input_schema={
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1}},
            "required": ["city"],
            "additionalProperties": False,
        },
        output_schema={"type": "object", "properties": {"celsius": {"type": "number"}}},
        side_effect=tool_pb2.SIDE_EFFECT_READ_ONLY,
    )
    for field, value in overrides.items():
        setattr(definition, field, value)
    return definition


# ---------------------------------------------------------------- discovery


async def test_list_all_tools(registry) -> None:
    response = await registry.ListTools(pb.ListToolsRequest(), timeout=TIMEOUT)
    assert [tool.name for tool in response.tools] == EVERYTHING
    # docs.search 1.1.0 added an optional output field (a compatible minor).
    assert {tool.name: tool.version for tool in response.tools} == {
        name: "1.1.0" if name == "docs.search" else "1.0.0" for name in EVERYTHING
    }
    assert all(tool.endpoint for tool in response.tools)


async def test_list_tools_for_assistant(registry) -> None:
    response = await registry.ListTools(pb.ListToolsRequest(agent="assistant"), timeout=TIMEOUT)
    assert [tool.name for tool in response.tools] == ["calculator", "notes.read", "notes.write"]


async def test_list_tools_for_researcher(registry) -> None:
    response = await registry.ListTools(pb.ListToolsRequest(agent="researcher"), timeout=TIMEOUT)
    assert [tool.name for tool in response.tools] == ["docs.search"]


async def test_list_tools_for_unknown_agent_is_not_found(registry) -> None:
    err = await rpc_error(registry.ListTools(pb.ListToolsRequest(agent="ghost"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in (err.details() or "")
    assert reason_of(err) == "AGENT_NOT_FOUND"


async def test_get_tool_returns_the_published_contract(registry) -> None:
    response = await registry.GetTool(pb.GetToolRequest(name="calculator"), timeout=TIMEOUT)
    assert contract_of(response.tool) == Calculator.definition
    assert response.tool.backend_kind == tool_pb2.BACKEND_KIND_EXECUTOR
    assert response.tool.state == tool_pb2.TOOL_STATE_ACTIVE
    schema = json.loads(response.tool.input_schema_json)
    assert schema["required"] == ["expression"]
    assert response.tool.side_effect == tool_pb2.SIDE_EFFECT_READ_ONLY


async def test_get_unknown_tool_is_not_found(registry) -> None:
    err = await rpc_error(registry.GetTool(pb.GetToolRequest(name="nope"), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(err) == "TOOL_NOT_FOUND"


async def test_get_tool_without_name_is_invalid(registry) -> None:
    err = await rpc_error(registry.GetTool(pb.GetToolRequest(name=""), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in (err.details() or "")


# ---------------------------------------------------------------- invocation


async def test_invoke_calculator(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("calculator", {"expression": "17*23"}, agent="assistant", session="s"),
        timeout=TIMEOUT,
    )
    assert response.WhichOneof("outcome") == "result_json"
    assert json.loads(response.result_json) == {"expression": "17*23", "result": 391}
    assert (response.tool_name, response.tool_version) == ("calculator", "1.0.0")
    assert response.replayed is False


async def test_invoke_as_operator_without_agent(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("calculator", {"expression": "7/2"}), timeout=TIMEOUT
    )
    assert json.loads(response.result_json)["result"] == 3.5


async def test_invoke_docs_search(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("docs.search", {"query": "registry", "limit": 2}, agent="researcher"),
        timeout=TIMEOUT,
    )
    results = json.loads(response.result_json)["results"]
    assert isinstance(results, list) and len(results) <= 2


async def test_invoke_unknown_tool_is_not_found(registry) -> None:
    err = await rpc_error(registry.InvokeTool(invoke_request("nope", {}), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(err) == "TOOL_NOT_FOUND"


async def test_agent_invoking_a_tool_it_was_not_granted_is_denied(registry) -> None:
    # Whether or not the tool exists: an agent learns nothing beyond its grants.
    err = await rpc_error(
        registry.InvokeTool(invoke_request("nope", {}, agent="assistant"), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_invoke_without_tool_name_is_invalid(registry) -> None:
    err = await rpc_error(registry.InvokeTool(invoke_request("", {}), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"expression": 17}, "$.expression"),
        ({"expression": ""}, "$.expression"),
        ({}, "expression"),
        ({"expression": "1", "code": "x"}, "code"),
    ],
)
async def test_arguments_failing_the_schema_are_invalid(registry, arguments, words) -> None:
    err = await rpc_error(
        registry.InvokeTool(invoke_request("calculator", arguments), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.details() or "")
    assert "calculator" in (err.details() or "")
    assert reason_of(err) == "INVALID_ARGUMENT"


@pytest.mark.parametrize("raw", ["{", "not json", "[1, 2]", '"17*23"', "null"])
async def test_malformed_arguments_are_invalid(registry, raw) -> None:
    err = await rpc_error(
        registry.InvokeTool(invoke_request("calculator", raw=raw), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "arguments_json" in (err.details() or "")


async def test_agent_may_only_use_its_own_tools(registry) -> None:
    err = await rpc_error(
        registry.InvokeTool(
            invoke_request("calculator", {"expression": "1+1"}, agent="researcher"),
            timeout=TIMEOUT,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "TOOL_NOT_ALLOWED"
    assert "researcher" in (err.details() or "") and "calculator" in (err.details() or "")


async def test_unknown_agent_may_use_nothing(registry) -> None:
    err = await rpc_error(
        registry.InvokeTool(
            invoke_request("calculator", {"expression": "1+1"}, agent="ghost"), timeout=TIMEOUT
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(err) == "TOOL_NOT_ALLOWED"


async def test_division_by_zero_is_a_tool_error_not_an_rpc_error(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("calculator", {"expression": "1/0"}, agent="assistant"), timeout=TIMEOUT
    )
    assert response.WhichOneof("outcome") == "error"
    assert response.error.code == "EXECUTION_FAILED"
    assert "division by zero" in response.error.message
    assert response.tool_version == "1.0.0"


async def test_code_in_an_expression_is_a_tool_error(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("calculator", {"expression": "__import__('os').getcwd()"}),
        timeout=TIMEOUT,
    )
    assert response.error.code == "EXECUTION_FAILED"


async def test_a_too_large_result_is_a_tool_error(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("calculator", {"expression": "99999**1000"}), timeout=TIMEOUT
    )
    assert response.error.code == "EXECUTION_FAILED"


async def test_result_json_is_strict_json(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("calculator", {"expression": "1e308*10"}), timeout=TIMEOUT
    )
    if response.WhichOneof("outcome") == "result_json":

        def reject(token: str) -> None:
            raise ValueError(f"non-standard JSON token {token}")

        json.loads(response.result_json, parse_constant=reject)
    else:
        assert response.error.code == "EXECUTION_FAILED"


# ---------------------------------------------------------------- notes & idempotency


async def stored_notes(redis_client: aioredis.Redis, key_prefix: str, session: str) -> list[str]:
    raw = await redis_client.lrange(f"{key_prefix}:notes:{session}", 0, -1)
    return [as_text(note) for note in raw]


async def test_notes_write_then_read_through_the_registry(registry) -> None:
    write = await registry.InvokeTool(
        invoke_request(
            "notes.write", {"text": "remember 42"}, agent="assistant", session="s1", key="w1"
        ),
        timeout=TIMEOUT,
    )
    assert json.loads(write.result_json) == {"saved": True, "note_count": 1}
    read = await registry.InvokeTool(
        invoke_request("notes.read", {}, agent="assistant", session="s1"), timeout=TIMEOUT
    )
    assert json.loads(read.result_json) == {"notes": ["remember 42"]}
    other = await registry.InvokeTool(
        invoke_request("notes.read", {}, agent="assistant", session="s2"), timeout=TIMEOUT
    )
    assert json.loads(other.result_json) == {"notes": []}


async def test_notes_without_session_is_a_tool_error(registry) -> None:
    response = await registry.InvokeTool(
        invoke_request("notes.write", {"text": "x"}, agent="assistant", key="k0"),
        timeout=TIMEOUT,
    )
    assert response.error.code == "NO_SESSION"


async def test_same_idempotency_key_writes_one_note(registry, redis_client, key_prefix) -> None:
    request = invoke_request(
        "notes.write", {"text": "only once"}, agent="assistant", session="s1", key="step-1"
    )
    first = await registry.InvokeTool(request, timeout=TIMEOUT)
    second = await registry.InvokeTool(request, timeout=TIMEOUT)
    assert first.replayed is False
    assert second.replayed is True
    assert second.result_json == first.result_json
    assert (second.tool_name, second.tool_version) == ("notes.write", "1.0.0")
    assert await stored_notes(redis_client, key_prefix, "s1") == ["only once"]
    read = await registry.InvokeTool(
        invoke_request("notes.read", {}, agent="assistant", session="s1"), timeout=TIMEOUT
    )
    assert json.loads(read.result_json) == {"notes": ["only once"]}


async def test_concurrent_retries_write_one_note(registry, redis_client, key_prefix) -> None:
    request = invoke_request(
        "notes.write", {"text": "raced"}, agent="assistant", session="race", key="step-1"
    )
    responses = await asyncio.gather(
        *(registry.InvokeTool(request, timeout=TIMEOUT) for _ in range(8))
    )
    assert sorted(r.replayed for r in responses) == [False] + [True] * 7
    assert {r.result_json for r in responses} == {json.dumps({"note_count": 1, "saved": True})}
    assert await stored_notes(redis_client, key_prefix, "race") == ["raced"]


async def test_same_key_different_arguments_is_a_conflict(
    registry, redis_client, key_prefix
) -> None:
    await registry.InvokeTool(
        invoke_request("notes.write", {"text": "first"}, agent="assistant", session="s", key="k"),
        timeout=TIMEOUT,
    )
    err = await rpc_error(
        registry.InvokeTool(
            invoke_request(
                "notes.write", {"text": "second"}, agent="assistant", session="s", key="k"
            ),
            timeout=TIMEOUT,
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == "IDEMPOTENCY_KEY_REUSED"
    assert await stored_notes(redis_client, key_prefix, "s") == ["first"]


async def test_idempotency_keys_are_scoped_by_session(registry, redis_client, key_prefix) -> None:
    for session in ("a", "b"):
        response = await registry.InvokeTool(
            invoke_request(
                "notes.write",
                {"text": f"for {session}"},
                agent="assistant",
                session=session,
                key="same-key",
            ),
            timeout=TIMEOUT,
        )
        assert response.replayed is False
    assert await stored_notes(redis_client, key_prefix, "a") == ["for a"]
    assert await stored_notes(redis_client, key_prefix, "b") == ["for b"]


async def test_side_effecting_tool_without_key_is_refused(
    registry, redis_client, key_prefix
) -> None:
    request = invoke_request("notes.write", {"text": "again"}, agent="assistant", session="s")
    err = await rpc_error(registry.InvokeTool(request, timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(err) == "IDEMPOTENCY_KEY_REQUIRED"
    assert await stored_notes(redis_client, key_prefix, "s") == []


async def test_read_only_tool_without_key_runs_every_time(registry) -> None:
    request = invoke_request("calculator", {"expression": "1+1"}, agent="assistant")
    for _ in range(2):
        assert (await registry.InvokeTool(request, timeout=TIMEOUT)).replayed is False


async def test_stored_tool_error_is_replayed(registry) -> None:
    request = invoke_request("notes.write", {"text": "x"}, agent="assistant", key="k")
    first = await registry.InvokeTool(request, timeout=TIMEOUT)
    second = await registry.InvokeTool(request, timeout=TIMEOUT)
    assert first.error.code == second.error.code == "NO_SESSION"
    assert (first.replayed, second.replayed) == (False, True)


async def test_rejected_call_runs_nothing_and_claims_nothing(
    registry, redis_client, key_prefix
) -> None:
    for arguments in ({"text": ""}, {"text": 5}, {"note": "x"}):
        err = await rpc_error(
            registry.InvokeTool(
                invoke_request("notes.write", arguments, agent="assistant", session="s", key="k"),
                timeout=TIMEOUT,
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await rpc_error(
        registry.InvokeTool(
            invoke_request("notes.write", {"text": "x"}, agent="researcher", session="s", key="k"),
            timeout=TIMEOUT,
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await redis_client.exists(f"{key_prefix}:notes:s") == 0
    assert await redis_client.keys(f"{key_prefix}:idempotency:*") == []
    # The key was never claimed, so a valid call with it runs for real.
    response = await registry.InvokeTool(
        invoke_request("notes.write", {"text": "valid"}, agent="assistant", session="s", key="k"),
        timeout=TIMEOUT,
    )
    assert response.replayed is False
    assert await stored_notes(redis_client, key_prefix, "s") == ["valid"]


async def test_overlong_idempotency_key_is_invalid(registry, redis_client, key_prefix) -> None:
    err = await rpc_error(
        registry.InvokeTool(
            invoke_request(
                "notes.write", {"text": "x"}, agent="assistant", session="s", key="k" * 201
            ),
            timeout=TIMEOUT,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await redis_client.exists(f"{key_prefix}:notes:s") == 0


# ---------------------------------------------------------------- registration


async def test_register_new_then_identical(registry) -> None:
    tool = weather()
    first = await registry.RegisterTool(pb.RegisterToolRequest(tool=tool), timeout=TIMEOUT)
    assert first.created is True
    assert contract_of(first.tool) == tool
    again = await registry.RegisterTool(pb.RegisterToolRequest(tool=tool), timeout=TIMEOUT)
    assert again.created is False
    got = await registry.GetTool(pb.GetToolRequest(name="weather.lookup"), timeout=TIMEOUT)
    assert contract_of(got.tool) == tool
    listed = await registry.ListTools(pb.ListToolsRequest(), timeout=TIMEOUT)
    assert [t.name for t in listed.tools] == sorted([*EVERYTHING, "weather.lookup"])
    # No agent's access list includes it.
    mine = await registry.ListTools(pb.ListToolsRequest(agent="assistant"), timeout=TIMEOUT)
    assert "weather.lookup" not in [t.name for t in mine.tools]


@pytest.mark.parametrize(
    ("version", "reason"), [("1.1.0", "VERSION_EXISTS"), ("1.0.5", "VERSION_NOT_NEWER")]
)
async def test_published_versions_are_immutable_and_ordered(registry, version, reason) -> None:
    await registry.RegisterTool(pb.RegisterToolRequest(tool=weather("1.0.0")), timeout=TIMEOUT)
    original = weather("1.1.0")
    await registry.RegisterTool(pb.RegisterToolRequest(tool=original), timeout=TIMEOUT)
    changed = weather(version, description="Something else entirely.")
    err = await rpc_error(
        registry.RegisterTool(pb.RegisterToolRequest(tool=changed), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == reason
    got = await registry.GetTool(pb.GetToolRequest(name="weather.lookup"), timeout=TIMEOUT)
    assert contract_of(got.tool) == original


async def test_higher_version_is_accepted(registry) -> None:
    await registry.RegisterTool(pb.RegisterToolRequest(tool=weather("1.0.0")), timeout=TIMEOUT)
    upgraded = weather("1.1.0", description="Looks up weather, now with humidity.")
    response = await registry.RegisterTool(pb.RegisterToolRequest(tool=upgraded), timeout=TIMEOUT)
    assert response.created is True
    got = await registry.GetTool(pb.GetToolRequest(name="weather.lookup"), timeout=TIMEOUT)
    assert (got.tool.version, got.tool.description) == (
        "1.1.0",
        "Looks up weather, now with humidity.",
    )


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {
                "input_schema_json": json.dumps(
                    {"type": "object", "properties": {"x": {"type": "nope"}}}
                )
            },
            "input_schema_json",
        ),
        ({"output_schema_json": "{not json"}, "output_schema_json"),
        ({"input_schema_json": json.dumps({"type": "array"})}, "input_schema_json"),
        ({"version": "1.0"}, "version"),
        ({"description": " "}, "description"),
    ],
)
async def test_invalid_contract_is_rejected_and_not_stored(registry, overrides, words) -> None:
    err = await rpc_error(
        registry.RegisterTool(pb.RegisterToolRequest(tool=weather(**overrides)), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (err.details() or "")
    missing = await rpc_error(
        registry.GetTool(pb.GetToolRequest(name="weather.lookup"), timeout=TIMEOUT)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["Weather", "a__b", "weather_", ""])
async def test_invalid_name_is_rejected(registry, name) -> None:
    err = await rpc_error(
        registry.RegisterTool(pb.RegisterToolRequest(tool=weather(name=name)), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tool.name" in (err.details() or "")


async def test_register_without_tool_is_invalid(registry) -> None:
    err = await rpc_error(registry.RegisterTool(pb.RegisterToolRequest(), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_builtin_contract_cannot_be_changed_in_place(registry) -> None:
    changed = tool_pb2.ToolDefinition()
    changed.CopyFrom(Calculator.definition)
    changed.description = "Evaluates anything."
    err = await rpc_error(
        registry.RegisterTool(pb.RegisterToolRequest(tool=changed), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_registered_tool_without_backend_cannot_run(registry) -> None:
    await registry.RegisterTool(pb.RegisterToolRequest(tool=weather()), timeout=TIMEOUT)
    err = await rpc_error(
        registry.InvokeTool(invoke_request("weather.lookup", {"city": "Oslo"}), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(err) == "NO_BACKEND"
    # Arguments are still validated first.
    err = await rpc_error(
        registry.InvokeTool(invoke_request("weather.lookup", {"city": ""}), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "$.city" in (err.details() or "")


# ---------------------------------------------------------------- persistence


async def test_state_survives_a_registry_restart(mesh, registry, channel_to) -> None:
    tool = weather("2.3.4")
    await registry.RegisterTool(pb.RegisterToolRequest(tool=tool), timeout=TIMEOUT)
    await registry.InvokeTool(
        invoke_request("notes.write", {"text": "kept"}, agent="assistant", session="s", key="k"),
        timeout=TIMEOUT,
    )

    second = await registry_app.build_host(mesh.settings, metrics_port=None)
    try:
        address = (await second.start()).address
        assert address != mesh.registry
        other = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel_to(address))
        got = await other.GetTool(pb.GetToolRequest(name="weather.lookup"), timeout=TIMEOUT)
        assert contract_of(got.tool) == tool
        listed = await other.ListTools(pb.ListToolsRequest(), timeout=TIMEOUT)
        assert [t.name for t in listed.tools] == sorted([*EVERYTHING, "weather.lookup"])
        calc = await other.GetTool(pb.GetToolRequest(name="calculator"), timeout=TIMEOUT)
        assert contract_of(calc.tool) == Calculator.definition
        # The idempotency ledger is shared too: the retry is a replay, not a second note.
        replay = await other.InvokeTool(
            invoke_request(
                "notes.write", {"text": "kept"}, agent="assistant", session="s", key="k"
            ),
            timeout=TIMEOUT,
        )
        assert replay.replayed is True
        read = await other.InvokeTool(
            invoke_request("notes.read", {}, agent="assistant", session="s"), timeout=TIMEOUT
        )
        assert json.loads(read.result_json) == {"notes": ["kept"]}
    finally:
        await second.stop()


async def test_restart_keeps_an_upgraded_builtin_contract(mesh, registry, channel_to) -> None:
    upgraded = tool_pb2.ToolDefinition()
    upgraded.CopyFrom(Calculator.definition)
    upgraded.version = "1.1.0"
    upgraded.description = "Evaluates arithmetic exactly (upgraded)."
    created = await registry.RegisterTool(pb.RegisterToolRequest(tool=upgraded), timeout=TIMEOUT)
    assert created.created is True

    second = await registry_app.build_host(mesh.settings, metrics_port=None)
    try:
        other = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(
            channel_to((await second.start()).address)
        )
        got = await other.GetTool(pb.GetToolRequest(name="calculator"), timeout=TIMEOUT)
        assert contract_of(got.tool) == upgraded  # the newest version is still the newest
    finally:
        await second.stop()


# ---------------------------------------------------------------- client-side error mapping


async def test_from_rpc_error_maps_the_status_code(registry) -> None:
    err = await rpc_error(registry.GetTool(pb.GetToolRequest(name="nope"), timeout=TIMEOUT))
    mapped = from_rpc_error(err)
    assert isinstance(mapped, errors.NotFound)
    assert "nope" in mapped.message


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (invoke_request("nope", {}), "TOOL_NOT_FOUND"),
        (invoke_request("calculator", {"expression": "1"}, agent="researcher"), "TOOL_NOT_ALLOWED"),
    ],
    ids=["unknown-tool", "not-allowed"],
)
async def test_from_rpc_error_keeps_the_registry_reason(registry, request_, reason) -> None:
    err = await rpc_error(registry.InvokeTool(request_, timeout=TIMEOUT))
    assert reason_of(err) == reason  # the server did send it
    assert from_rpc_error(err).reason == reason


async def test_an_agents_default_list_follows_its_spec_but_never_beats_an_operator(
    registry,
) -> None:
    def grants(*names: str) -> list[pb.ToolGrant]:
        return [pb.ToolGrant(name=name, major=1) for name in names]

    async def publish(*names: str, default: bool) -> pb.SetAgentToolsResponse:
        request = pb.SetAgentToolsRequest(
            agent="greeter", grants=grants(*names), only_if_unset=default
        )
        response: pb.SetAgentToolsResponse = await registry.SetAgentTools(request, timeout=TIMEOUT)
        return response

    first = await publish("calculator", default=True)
    assert first.applied
    # The spec changed (a persisted Redis): the new default replaces the old one.
    changed = await publish("calculator", "notes.read", default=True)
    assert changed.applied
    assert sorted(g.name for g in changed.grants) == ["calculator", "notes.read"]
    # An operator's list replaces it, and no later default replaces the operator's.
    operator = await publish("notes.read", default=False)
    assert operator.applied
    again = await publish("calculator", "notes.read", default=True)
    assert not again.applied
    assert [g.name for g in again.grants] == ["notes.read"]
