"""The scripted model as a supervisor: independent parts go to different agents at once."""

from __future__ import annotations

import json

from agentplex.agents.llm.base import ToolCall, ToolSpec
from agentplex.agents.llm.scripted import compose_answer, plan_tool_calls

AGENT_TOOLS = [ToolSpec("agent.assistant", "", "{}"), ToolSpec("agent.researcher", "", "{}")]


def test_arithmetic_and_a_question_become_two_delegations_in_one_turn() -> None:
    calls = plan_tool_calls(
        "what is 17*23 and how does the tool registry validate arguments?", AGENT_TOOLS
    )
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("agent.assistant", {"prompt": "what is 17*23"}),
        ("agent.researcher", {"prompt": "how does the tool registry validate arguments?"}),
    ]


def test_only_what_matches_is_delegated() -> None:
    assert [c.name for c in plan_tool_calls("what is 6*7?", AGENT_TOOLS)] == ["agent.assistant"]
    assert [c.name for c in plan_tool_calls("How do I run the tests?", AGENT_TOOLS)] == [
        "agent.researcher"
    ]
    assert plan_tool_calls("hello", AGENT_TOOLS) == []


def test_the_answer_names_each_agent_and_its_failures() -> None:
    ok = ToolCall("call_1", "agent.assistant", json.dumps({"prompt": "what is 6*7"}))
    broken = ToolCall("call_2", "agent.researcher", json.dumps({"prompt": "how?"}))
    answer = compose_answer(
        [
            (ok, {"output": "6*7 = 42.", "error": ""}),
            (broken, {"error": {"code": "CIRCUIT_OPEN", "message": "not being called"}}),
        ]
    )
    assert answer == "assistant: 6*7 = 42. agent.researcher failed: not being called."
