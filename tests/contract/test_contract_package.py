"""The shared contract package: the pieces every service agrees on."""

from __future__ import annotations

import re
from pathlib import Path

from agentplex.contract import agent_tool, limits
from agentplex.contract.events import is_final
from agentplex.contract.reasons import Reason, ToolErrorCode
from agentplex.v1 import step_event_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVICE_CODE = ["agents", "registry", "memory", "tools", "tasks", "gateway", "runtime", "clients"]


def test_only_the_two_final_kinds_end_a_stream() -> None:
    assert is_final(step_event_pb2.StepEvent(final_result=step_event_pb2.TaskFinished()))
    assert is_final(step_event_pb2.StepEvent(error=step_event_pb2.TaskFailed()))
    assert not is_final(step_event_pb2.StepEvent(step_started=step_event_pb2.StepStarted()))
    assert not is_final(step_event_pb2.StepEvent())


def test_the_agent_tool_names_round_trip_and_take_the_protocol_limits() -> None:
    assert agent_tool.tool_name("researcher") == "agent.researcher"
    assert agent_tool.agent_of_tool("agent.researcher") == "researcher"
    assert agent_tool.is_agent_tool("agent.x") and not agent_tool.is_agent_tool("calculator")
    tool = agent_tool.definition(agent="x", version="1.2.3", description="does x")
    assert tool.name == "agent.x" and tool.version == "1.2.3"
    budget = agent_tool.INPUT_SCHEMA["properties"]["token_budget"]
    assert (budget["minimum"], budget["maximum"]) == (
        limits.MIN_TOKEN_BUDGET,
        limits.MAX_TOKEN_BUDGET,
    )


def test_every_reason_raised_in_service_code_is_in_the_catalog() -> None:
    """A reason is protocol: one that is raised but not catalogued would be an
    undocumented value clients cannot rely on."""
    raised: set[str] = set()
    for folder in SERVICE_CODE:
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            raised |= set(re.findall(r'reason="([A-Z_]+)"', text))
            raised |= set(re.findall(r"reason=Reason\.([A-Z_]+)", text))
            raised |= set(re.findall(r"ToolErrorCode\.([A-Z_]+)", text))
    generic = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAVAILABLE"}
    catalogued = {r.value for r in Reason} | {c.value for c in ToolErrorCode} | generic
    assert raised - catalogued == set()
    assert raised, "the scan found no reasons at all: the pattern is wrong"
