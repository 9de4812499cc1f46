"""The scripted test model: deterministic planning and answers."""

from __future__ import annotations

import json

import pytest

from agentplex.agents.llm.base import (
    ChatMessage,
    Completion,
    CompletionRequest,
    TextDelta,
    ToolSpec,
)
from agentplex.agents.llm.scripted import ScriptedLLM, plan_tool_calls

ALL_TOOLS = [
    ToolSpec(n, n, "{}") for n in ("calculator", "notes.write", "notes.read", "docs.search")
]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("what is 17*23?", [("calculator", {"expression": "17*23"})]),
        ("what is 17 x 23", [("calculator", {"expression": "17*23"})]),
        (
            "compute (2+3)**2 and 10/4",
            [("calculator", {"expression": "(2+3)**2"}), ("calculator", {"expression": "10/4"})],
        ),
        (
            "remember that the door code is 4512",
            [("notes.write", {"text": "the door code is 4512"})],
        ),
        ("what did I ask you to remember?", [("notes.read", {})]),
        (
            "How does the registry work?",
            [("docs.search", {"query": "How does the registry work?"})],
        ),
        ("hello there", []),
    ],
)
def test_plans_tools_from_the_prompt(
    prompt: str, expected: list[tuple[str, dict[str, str]]]
) -> None:
    calls = plan_tool_calls(prompt, ALL_TOOLS)
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == expected


def test_only_offered_tools_are_planned() -> None:
    assert plan_tool_calls("what is 2+2?", [ToolSpec("docs.search", "", "{}")])[0].name == (
        "docs.search"
    )
    assert plan_tool_calls("what is 2+2", []) == []


async def collect(llm: ScriptedLLM, messages: list[ChatMessage]) -> tuple[str, Completion]:
    text, completion = "", None
    async for event in llm.stream(CompletionRequest(messages=messages, tools=ALL_TOOLS)):
        if isinstance(event, TextDelta):
            text += event.text
        else:
            completion = event
    assert completion is not None
    return text, completion


async def test_answers_from_tool_results_streaming_deltas() -> None:
    llm = ScriptedLLM()
    _, planned = await collect(llm, [ChatMessage("user", "what is 17*23?")])
    assert planned.finish_reason == "tool_calls"
    [call] = planned.tool_calls
    text, done = await collect(
        llm,
        [
            ChatMessage("user", "what is 17*23?"),
            ChatMessage("assistant", "", planned.tool_calls),
            ChatMessage(
                "tool", json.dumps({"expression": "17*23", "result": 391}), tool_call_id=call.id
            ),
        ],
    )
    assert text == done.content == "17*23 = 391."
    assert done.finish_reason == "stop"
    assert done.usage.estimated and done.usage.prompt_tokens > 0


async def test_reports_tool_errors_in_its_answer() -> None:
    llm = ScriptedLLM()
    _, planned = await collect(llm, [ChatMessage("user", "what is 1/0")])
    _, done = await collect(
        llm,
        [
            ChatMessage("user", "what is 1/0"),
            ChatMessage("assistant", "", planned.tool_calls),
            ChatMessage(
                "tool",
                json.dumps({"error": {"code": "EXECUTION_FAILED", "message": "division by zero"}}),
                tool_call_id=planned.tool_calls[0].id,
            ),
        ],
    )
    assert done.content == "calculator failed: division by zero."


async def test_is_deterministic() -> None:
    messages = [ChatMessage("user", "what is 6*7 and 1+1?")]
    first = await collect(ScriptedLLM(), messages)
    second = await collect(ScriptedLLM(), messages)
    assert first == second
